//! Any bytes as SQL (and as bind values) through `router::plan`: must return
//! a plan or an error, never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shardgate_router::id::{IdGenerator, SystemClock};
use shardgate_router::month::MonthKey;
use shardgate_router::{Context, Param, Topology};

struct World {
    topo: Topology,
    months: Vec<MonthKey>,
    ids: IdGenerator,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let topo = Topology::example();
        let months = (1..=12).filter_map(|m| MonthKey::new(2026, m)).collect();
        let ids = IdGenerator::new(topo.ids.clone(), 1, 50, Box::new(SystemClock), 0).expect("ids");
        World { topo, months, ids }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    // First line: SQL; following NUL-separated chunks: bind values (text and binary).
    let (sql, rest) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(sql) = std::str::from_utf8(sql) else { return };
    let chunks: Vec<&[u8]> = rest.split(|b| *b == 0).take(16).collect();
    let texts: Vec<String> = chunks.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    let now = jiff::Timestamp::from_second(1_795_341_600).expect("now");
    let ctx = Context { now, months: &w.months, ids: Some(&w.ids), zone: Default::default(), lookups: &[] };
    let text_params: Vec<Param<'_>> = texts.iter().map(|t| Param::Text(t)).collect();
    let _ = shardgate_router::plan(sql, &text_params, &w.topo, &ctx);
    let bin_params: Vec<Param<'_>> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| Param::Binary { oid: [0, 20, 23, 1184, 1082, 1016][i % 6], bytes: c })
        .collect();
    let _ = shardgate_router::plan(sql, &bin_params, &w.topo, &ctx);
});
