//! The `tg-pubsub` program, run as a user runs it.

use std::process::{Command, Output};

fn tg_pubsub(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tg-pubsub"));
    cmd.args(args)
        .env_remove("PUBSUB_BACKEND")
        .env_remove("PUBSUB_FALLBACK")
        .env_remove("MEMORY_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tg-pubsub")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn both_round_trips_on_memory() {
    let out = tg_pubsub(&["both", "--count", "25"], &[]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("round trip OK: 25/25 messages"), "{stdout}");
    assert!(stdout.contains("through memory"), "{stdout}");
}

#[test]
fn bench_prints_the_table() {
    let out = tg_pubsub(
        &[
            "bench",
            "--messages",
            "2000",
            "--typed-messages",
            "500",
            "--rate",
            "200",
            "--rate-seconds",
            "0.2",
        ],
        &[],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("| throughput | raw bytes | 2000 |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| throughput | typed JSON | 500 |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| 200 msg/s | raw bytes | 40 |"),
        "{stdout}"
    );
}

#[test]
fn unknown_backend_is_a_clear_error() {
    let out = tg_pubsub(&["both"], &[("PUBSUB_BACKEND", "kafka")]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown backend \"kafka\""), "{stderr}");
    assert!(stderr.contains("compiled in: memory"), "{stderr}");
}

#[test]
fn malformed_variable_is_named() {
    let out = tg_pubsub(&["both"], &[("MEMORY_URL", "memory://?capacity=many")]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("MEMORY_URL / --memory-url"), "{stderr}");
    assert!(stderr.contains("capacity"), "{stderr}");
}

#[test]
fn bad_topic_names_the_segment() {
    let out = tg_pubsub(&["publish", "--topic", "q1/tg/flow/a+b"], &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("queue segment contains '+'"), "{stderr}");
}

#[test]
fn publish_then_listen_with_earliest() {
    // one process per command, so each gets its own in-memory broker: publish reports success,
    // listen times out idle without error
    let out = tg_pubsub(
        &[
            "publish",
            "--topic",
            "q1/tg/flow/cli-test",
            "--count",
            "3",
            "--property",
            "id=7",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("published 3 message(s) to q1/tg/flow/cli-test on memory"));
    let out = tg_pubsub(
        &[
            "listen",
            "--topic",
            "q1/tg/flow/cli-test",
            "--idle-timeout",
            "0.3",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("received 0 message(s)"),
        "{}",
        text(&out.stderr)
    );
}

#[cfg(unix)]
#[test]
fn listen_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tg-pubsub"))
        .args(["listen", "--topic", "q1/tg/flow/cli-sigterm"])
        .env_remove("PUBSUB_BACKEND")
        .env_remove("PUBSUB_FALLBACK")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tg-pubsub listen");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    // Wait until it listens, then ask it to stop as a service manager would.
    let mut line = String::new();
    stderr.read_line(&mut line).expect("first line");
    assert!(
        line.contains("listening on q1/tg/flow/cli-sigterm"),
        "{line}"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("wait");
    let mut rest = String::new();
    for l in stderr.lines().map_while(Result::ok) {
        rest.push_str(&l);
        rest.push('\n');
    }
    assert!(status.success(), "exit {status}; stderr: {rest}");
    assert!(rest.contains("stopping"), "{rest}");
    assert!(rest.contains("received 0 message(s)"), "{rest}");
}

/// A bench on a broker uses topics of its own run and removes them afterwards: nothing of the
/// run (stream, group) is left in Redis.
#[test]
fn bench_on_redis_leaves_nothing_behind() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let client = redis::Client::open(url.as_str()).expect("Redis URL");
    let Ok(mut conn) = client.get_connection() else {
        tg_testkit::support::skip(&format!("no Redis at {url}"));
        return;
    };
    let out = tg_pubsub(
        &[
            "bench",
            "--messages",
            "2000",
            "--typed-messages",
            "300",
            "--rate",
            "100",
            "--rate-seconds",
            "0.2",
        ],
        &[("PUBSUB_BACKEND", "redis"), ("REDIS_URL", &url)],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // "bench on backend redis topics q1/tg/bench-<run>: …"
    let namespace = stdout
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("q1/tg/")
                .map(|n| n.trim_end_matches(':').to_owned())
        })
        .unwrap_or_else(|| panic!("no topic in {stdout}"));
    assert!(namespace.starts_with("bench-"), "{stdout}");
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{namespace}*"))
        .query(&mut conn)
        .expect("KEYS");
    assert!(left.is_empty(), "the bench left {left:?}");
}
