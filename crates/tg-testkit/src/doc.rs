//! Checks a backend's page in `docs/` against the backend itself, so the page cannot drift:
//! the sections every page has, the capabilities table against `capabilities()`, and the
//! options table against the driver's options (each documented default is run through the
//! backend's configuration).

use tg_backend_api::kit::{Driver, Settings};
use tg_backend_api::{Capabilities, Qos};

/// The sections (`## …` headings) every backend page has, in this order.
pub const SECTIONS: [&str; 5] = [
    "Mapping",
    "Capabilities",
    "Configuration",
    "Limits",
    "Benchmarks",
];

/// Reads one capability out of [`Capabilities`].
type Read = fn(&Capabilities) -> Cell;

/// The rows of the capabilities table: the capability's name and how to read it.
fn capability_rows() -> Vec<(&'static str, Read)> {
    vec![
        ("persistent", |c| Cell::Flag(c.persistent)),
        ("durable_subscriptions", |c| {
            Cell::Flag(c.durable_subscriptions)
        }),
        ("ordered", |c| Cell::Flag(c.ordered)),
        ("shared", |c| Cell::Flag(c.shared)),
        ("exclusive", |c| Cell::Flag(c.exclusive)),
        ("failover", |c| Cell::Flag(c.failover)),
        ("earliest", |c| Cell::Flag(c.earliest)),
        ("nack_redelivery", |c| Cell::Flag(c.nack_redelivery)),
        ("redelivery_count", |c| Cell::Flag(c.redelivery_count)),
        ("redeliver_unacked_on_close", |c| {
            Cell::Flag(c.redeliver_unacked_on_close)
        }),
        ("deduplication", |c| Cell::Flag(c.deduplication)),
        ("retained", |c| Cell::Flag(c.retained)),
        ("acknowledgement", |c| Cell::Flag(c.acknowledgement)),
        ("max_payload", |c| Cell::Bytes(c.max_payload)),
    ]
}

#[derive(Debug, PartialEq, Eq)]
enum Cell {
    Flag(bool),
    Bytes(usize),
}

impl Cell {
    fn parse(text: &str) -> Option<Cell> {
        match text {
            "yes" => return Some(Cell::Flag(true)),
            "no" => return Some(Cell::Flag(false)),
            _ => {}
        }
        parse_size(text).map(Cell::Bytes)
    }
}

/// `5 MiB`, `64 KiB`, `1 GiB`, `65,536` or `65536 bytes`.
fn parse_size(text: &str) -> Option<usize> {
    let mut words = text.split_whitespace();
    let number: usize = words.next()?.replace(',', "").parse().ok()?;
    let unit = match words.next() {
        None | Some("bytes") | Some("B") => 1,
        Some("KiB") => 1 << 10,
        Some("MiB") => 1 << 20,
        Some("GiB") => 1 << 30,
        Some(_) => return None,
    };
    words.next().is_none().then(|| number * unit)
}

/// The body of section `## name` (up to the next `## `), if the page has it.
fn section<'a>(page: &'a str, name: &str) -> Option<&'a str> {
    let heading = format!("## {name}\n");
    let start = page.find(&heading)? + heading.len();
    let rest = &page[start..];
    Some(rest.find("\n## ").map_or(rest, |end| &rest[..end]))
}

/// The rows of the first markdown table in `text` whose header starts with `first`, as cells
/// with surrounding spaces trimmed (header and separator left out).
fn table_rows<'a>(text: &'a str, first: &str) -> Vec<Vec<&'a str>> {
    let cells = |line: &'a str| -> Vec<&'a str> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect()
    };
    let mut lines = text
        .lines()
        .skip_while(|l| !(l.trim_start().starts_with('|') && cells(l).first() == Some(&first)));
    if lines.next().is_none() {
        return Vec::new();
    }
    lines
        .skip(1)
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(cells)
        .collect()
}

fn unticked(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

/// Checks `page` (a backend's `docs/*.md`) against the backend's capabilities per QoS (`caps`,
/// indexed by [`Qos::level`]) and, when given, its driver. Returns every problem found.
pub fn check_page(
    page: &str,
    caps: &[Capabilities; 3],
    driver: Option<&'static Driver>,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let headings: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(str::trim)
        .collect();
    let found: Vec<&str> = headings
        .iter()
        .copied()
        .filter(|h| SECTIONS.contains(h))
        .collect();
    if found != SECTIONS {
        problems.push(format!(
            "the page's sections are {headings:?}; every backend page has {SECTIONS:?} in this order"
        ));
    }
    check_capabilities(
        section(page, "Capabilities").unwrap_or(""),
        caps,
        &mut problems,
    );
    if let Some(driver) = driver {
        check_options(
            section(page, "Configuration").unwrap_or(""),
            driver,
            &mut problems,
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn check_capabilities(text: &str, caps: &[Capabilities; 3], problems: &mut Vec<String>) {
    let rows = table_rows(text, "capability");
    if rows.is_empty() {
        problems
            .push("the Capabilities section has no `| capability | q0 | q1 | q2 |` table".into());
        return;
    }
    for (name, read) in capability_rows() {
        let Some(row) = rows.iter().find(|r| r.first() == Some(&name)) else {
            problems.push(format!("the capabilities table has no row `{name}`"));
            continue;
        };
        for qos in Qos::ALL {
            let level = qos.level() as usize;
            let actual = read(&caps[level]);
            let written = row.get(level + 1).copied().unwrap_or("");
            match Cell::parse(written) {
                Some(cell) if cell == actual => {}
                _ => problems.push(format!(
                    "capabilities table: {name} for {qos} says {written:?}, the backend says {actual:?}"
                )),
            }
        }
    }
    let known: Vec<&str> = capability_rows().iter().map(|(n, _)| *n).collect();
    for row in &rows {
        if !known.contains(&row[0]) {
            problems.push(format!(
                "the capabilities table has a row {:?} that is no capability",
                row[0]
            ));
        }
    }
}

fn check_options(text: &str, driver: &'static Driver, problems: &mut Vec<String>) {
    let rows = table_rows(text, "option");
    let known = (driver.options)();
    let documented: Vec<&str> = rows.iter().filter_map(|r| unticked(r[0])).collect();
    for name in &known {
        if !documented.contains(name) {
            problems.push(format!(
                "option `{name}` of the {} driver is not in the Configuration table",
                driver.name
            ));
        }
    }
    for name in &documented {
        if !known.contains(name) {
            problems.push(format!(
                "the Configuration table documents `{name}`, which the {} driver does not know",
                driver.name
            ));
        }
    }
    let base = driver
        .url_setting()
        .default
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{}://127.0.0.1", driver.schemes[0]));
    for row in &rows {
        let (Some(name), Some(default)) = (unticked(row[0]), row.get(1).and_then(|c| unticked(c)))
        else {
            continue;
        };
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}{name}={default}");
        if let Err(e) = configure(driver, &url) {
            problems.push(format!(
                "the documented default of `{name}` ({default}) is refused: {e}"
            ));
        }
    }
    let url = format!(
        "{base}{}no_such_option=1",
        if base.contains('?') { '&' } else { '?' }
    );
    match configure(driver, &url) {
        Ok(()) => problems.push(format!(
            "{url} was accepted; an unknown option must be refused"
        )),
        Err(e) => {
            if let Some(missing) = known.iter().find(|n| !e.contains(*n)) {
                problems.push(format!(
                    "the error for an unknown option does not list the known option `{missing}`: {e}"
                ));
            }
        }
    }
}

fn configure(driver: &'static Driver, url: &str) -> Result<(), String> {
    let url_env = driver.url_setting().env;
    let url = url.to_owned();
    let lookup = move |name: &str| (name == url_env).then(|| url.clone());
    (driver.configure)(&Settings::new(driver, &lookup))
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# x\n\n## Mapping\n\ntext\n\n## Capabilities\n\n\
| capability | q0 | q1 | q2 | why |\n|---|---|---|---|---|\n\
| persistent | no | yes | yes | |\n| max_payload | 5 MiB | 5 MiB | 5 MiB | |\n\n\
## Configuration\n\n## Limits\n\n## Benchmarks\n";

    fn caps() -> [Capabilities; 3] {
        let mut caps = [Capabilities::NONE; 3];
        for (level, c) in caps.iter_mut().enumerate() {
            c.persistent = level > 0;
            c.max_payload = 5 << 20;
        }
        caps
    }

    #[test]
    fn sizes_read_as_written_in_the_docs() {
        assert_eq!(parse_size("5 MiB"), Some(5 << 20));
        assert_eq!(parse_size("65,536"), Some(65_536));
        assert_eq!(parse_size("256 KiB"), Some(256 << 10));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn a_matching_table_passes_and_names_only_the_missing_rows() {
        let problems = check_page(PAGE, &caps(), None).unwrap_err();
        assert!(
            problems.iter().all(|p| p.contains("has no row")),
            "{problems:?}"
        );
        assert!(problems.iter().any(|p| p.contains("`ordered`")));
        assert!(!problems.iter().any(|p| p.contains("`persistent`")));
    }

    #[test]
    fn a_wrong_cell_and_a_missing_section_are_reported() {
        let wrong = PAGE
            .replace("| persistent | no |", "| persistent | yes |")
            .replace("## Limits\n\n", "");
        let problems = check_page(&wrong, &caps(), None).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("persistent for q0")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("sections")),
            "{problems:?}"
        );
    }
}
