//! Router golden tests: every case in `tests/golden/*.txt` must plan exactly as recorded.
//! `UPDATE_GOLDEN=1 cargo test -p shardgate-router --test golden` rewrites the files (review the diff).

#[path = "common/golden_cases.rs"]
mod golden_cases;

#[test]
fn golden_plans() {
    let mut cases = golden_cases::load();
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut failures = Vec::new();
    for c in cases.iter_mut() {
        // A fresh world per case keeps generated ids independent of case order.
        let world = golden_cases::World::new();
        let got = world.render(c);
        if got != c.expected {
            if update {
                c.expected = got;
            } else {
                failures.push(format!("{} / {}\n  sql: {}\n  expected:\n{}\n  got:\n{}", c.file, c.name, c.sql, c.expected, got));
            }
        }
    }
    if update {
        golden_cases::save(&cases);
    }
    assert!(failures.is_empty(), "{} golden case(s) differ:\n\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn golden_set_is_large_and_covers_every_topic() {
    let cases = golden_cases::load();
    assert!(cases.len() >= 150, "only {} golden cases", cases.len());
    for topic in ["select.txt", "insert.txt", "update_delete.txt", "months.txt", "ids.txt", "unsupported.txt"] {
        let n = cases.iter().filter(|c| c.file == topic).count();
        assert!(n >= 10, "{topic} has {n} cases");
    }
    for c in &cases {
        assert!(!c.expected.is_empty(), "{} / {} has no expectation", c.file, c.name);
        if c.expected.starts_with("error") {
            // Every error case names its SQLSTATE and a message.
            let (state, msg) = c.expected["error ".len()..].split_once(": ").expect("error SQLSTATE: message");
            assert_eq!(state.len(), 5, "{}", c.name);
            assert!(msg.len() > 10, "{}", c.name);
        }
    }
    let errors = cases.iter().filter(|c| c.file == "unsupported.txt" && c.expected.starts_with("error 0A000")).count();
    assert!(errors >= 15, "unsupported.txt has {errors} 0A000 cases");
}
