//! Any bytes as SQL (and as bind values) through `router::plan`: must return
//! a plan or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "world.rs"]
mod world;
use world::world;
use shardgate_router::Param;

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
    let ctx = w.ctx();
    let text_params: Vec<Param<'_>> = texts.iter().map(|t| Param::Text(t)).collect();
    let _ = shardgate_router::plan(sql, &text_params, &w.topo, &ctx);
    let bin_params: Vec<Param<'_>> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| Param::Binary { oid: [0, 20, 23, 1184, 1082, 1016][i % 6], bytes: c })
        .collect();
    let _ = shardgate_router::plan(sql, &bin_params, &w.topo, &ctx);
});
