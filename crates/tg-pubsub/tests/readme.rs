//! The README shows the examples verbatim, so what readers copy is what CI compiles.

#[test]
fn readme_shows_the_framework_service_example_verbatim() {
    let readme = include_str!("../../../README.md");
    let example = include_str!("../examples/framework_service.rs");
    assert!(
        readme.contains(&format!("```rust\n{example}```")),
        "README.md does not show crates/tg-pubsub/examples/framework_service.rs as it is"
    );
    assert!(
        example.lines().count() < 30,
        "the example promises a service in under 30 lines"
    );
}
