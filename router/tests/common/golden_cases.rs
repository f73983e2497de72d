//! Golden router cases: `(sql, params) -> plan` tables by topic in
//! `router/tests/golden/*.txt`, shared by the router's own test and the
//! integration test that runs every rewritten statement on PostgreSQL.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use shardgate_router::id::{Clock, IdGenerator};
use shardgate_router::month::MonthKey;
use shardgate_router::{Context, Param, Topology};

/// One case.
#[derive(Debug, Clone)]
pub struct Case {
    pub file: String,
    pub name: String,
    pub sql: String,
    /// `None` = SQL NULL.
    pub params: Vec<Option<String>>,
    pub expected: String,
}

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../router/tests/golden")
}

/// Reads every `*.txt` file: `### name`, `SQL …`, `PARAM …` (or `PARAM NULL`), `---`, expected lines.
pub fn load() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read golden");
        let file = f.file_name().expect("name").to_string_lossy().to_string();
        for block in text.split("\n### ").map(|b| b.trim_start_matches("### ")) {
            if block.trim().is_empty() {
                continue;
            }
            let mut lines = block.lines();
            let name = lines.next().expect("name").trim().to_string();
            let (mut sql, mut params, mut expected, mut in_expected) = (String::new(), Vec::new(), Vec::new(), false);
            for l in lines {
                if in_expected {
                    expected.push(l);
                } else if let Some(s) = l.strip_prefix("SQL ") {
                    sql = s.to_string();
                } else if let Some(p) = l.strip_prefix("PARAM ") {
                    params.push(if p == "NULL" { None } else { Some(p.to_string()) });
                } else if l == "PARAM" {
                    params.push(Some(String::new()));
                } else if l == "---" {
                    in_expected = true;
                }
            }
            let expected = expected.join("\n").trim_end().to_string();
            out.push(Case { file: file.clone(), name, sql, params, expected });
        }
    }
    out
}

/// Writes cases back (UPDATE_GOLDEN=1).
pub fn save(cases: &[Case]) {
    let mut by_file: std::collections::BTreeMap<&str, String> = Default::default();
    for c in cases {
        let s = by_file.entry(&c.file).or_default();
        s.push_str(&format!("### {}\nSQL {}\n", c.name, c.sql));
        for p in &c.params {
            match p {
                None => s.push_str("PARAM NULL\n"),
                Some(v) if v.is_empty() => s.push_str("PARAM\n"),
                Some(v) => s.push_str(&format!("PARAM {v}\n")),
            }
        }
        s.push_str(&format!("---\n{}\n\n", c.expected));
    }
    for (f, s) in by_file {
        std::fs::write(golden_dir().join(f), s).expect("write golden");
    }
}

struct Fixed(Arc<AtomicI64>);
impl Clock for Fixed {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst) as u64
    }
}

/// 2026-11-22T10:00:00Z.
pub const NOW_MS: i64 = 1_795_341_600_000;

/// The fixed world the golden cases are planned in.
pub struct World {
    pub topo: Topology,
    /// The same with `ids.route_by_id = true` (the cases in ids.txt).
    pub topo_route_by_id: Topology,
    pub months: Vec<MonthKey>,
    pub ids: IdGenerator,
}

impl World {
    pub fn new() -> World {
        let topo = Topology::example();
        // Month tables 2026-09 .. 2027-01 exist (crosses a year boundary).
        let months = vec![
            MonthKey { year: 2026, month: 9 },
            MonthKey { year: 2026, month: 10 },
            MonthKey { year: 2026, month: 11 },
            MonthKey { year: 2026, month: 12 },
            MonthKey { year: 2027, month: 1 },
        ];
        let ids = IdGenerator::new(topo.ids.clone(), 1, 50, Box::new(Fixed(Arc::new(AtomicI64::new(NOW_MS)))), 0).expect("id generator");
        let mut topo_route_by_id = topo.clone();
        topo_route_by_id.ids.route_by_id = true;
        World { topo, topo_route_by_id, months, ids }
    }

    pub fn ctx(&self) -> Context<'_> {
        Context { now: jiff::Timestamp::from_millisecond(NOW_MS).expect("now"), months: &self.months, ids: Some(&self.ids), zone: Default::default(), lookups: &[] }
    }

    /// The plan (or error) printed as in the golden files.
    pub fn render(&self, c: &Case) -> String {
        let params: Vec<Param<'_>> = c.params.iter().map(|p| p.as_deref().map_or(Param::Null, Param::Text)).collect();
        let topo = if c.file == "ids.txt" { &self.topo_route_by_id } else { &self.topo };
        match shardgate_router::plan(&c.sql, &params, topo, &self.ctx()) {
            Ok(p) => p.to_string().trim_end().to_string(),
            Err(e) => format!("error {}: {e}", e.sqlstate()),
        }
    }
}
