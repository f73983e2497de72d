//! Every rewritten statement of the router's golden set runs on real
//! PostgreSQL 15 shards holding the month tables (each inside a transaction
//! that is rolled back), with its bind values sent in text format.

#[path = "../../router/tests/common/golden_cases.rs"]
mod golden_cases;

use std::collections::BTreeSet;
use std::error::Error;

use bytes::BytesMut;
use postgres_types::{to_sql_checked, Format, IsNull, ToSql, Type};
use shardgate_router::{Plan, Topology};
use shardgate_tests::schema::T_ORDER_TEMPLATE;
use shardgate_tests::{connect, Cluster, Options};

/// A bind value sent as text, whatever the parameter type: the server parses it as a client's text value would be.
#[derive(Debug)]
struct TextParam(Option<String>);

impl ToSql for TextParam {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
        }
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }
    to_sql_checked!();
}

#[tokio::test]
async fn every_golden_rewrite_runs_on_postgres() {
    let c = Cluster::start_temp(Options { all_clusters: true, ..Options::default() }).expect("start clusters");
    let world = golden_cases::World::new();
    let topo: &Topology = &world.topo;
    let rule = &topo.tables[0];
    let cases = golden_cases::load();

    // Plans first, to learn which month tables they touch.
    let mut plans = Vec::new();
    let mut months: BTreeSet<_> = world.months.iter().copied().collect();
    for case in &cases {
        let w = golden_cases::World::new();
        let params: Vec<_> = case.params.iter().map(|p| p.as_deref().map_or(shardgate_router::Param::Null, shardgate_router::Param::Text)).collect();
        if let Ok(Plan::Routed(r)) = shardgate_router::plan(&case.sql, &params, &w.topo, &w.ctx()) {
            for t in &r.targets {
                months.extend(t.months.iter().copied());
            }
            plans.push((case, r));
        }
    }
    assert!(plans.len() >= 120, "only {} routed golden cases", plans.len());

    let mut clients = Vec::new();
    for dsn in &c.info.shards {
        let client = connect(dsn).await.expect("connect shard");
        client.batch_execute(T_ORDER_TEMPLATE).await.expect("template");
        for m in &months {
            client.batch_execute(&rule.create_month_table_sql(*m)).await.expect("month table");
        }
        clients.push(client);
    }

    let mut ran = 0;
    let mut failures = Vec::new();
    for (case, routed) in &plans {
        for t in &routed.targets {
            let client = &clients[usize::from(t.shard.0)];
            let all: Vec<TextParam> = case.params.iter().map(|p| TextParam(p.clone())).collect();
            let mut picked: Vec<&TextParam> = match &t.params {
                None => all.iter().collect(),
                Some(map) => map.iter().map(|i| &all[*i]).collect(),
            };
            // values the router generated (ids, times) follow the client's, as text
            let extra: Vec<TextParam> = t.extra.iter().map(|e| TextParam(Some(e.clone()))).collect();
            picked.extend(extra.iter());
            let refs: Vec<&(dyn ToSql + Sync)> = picked.iter().map(|p| *p as &(dyn ToSql + Sync)).collect();
            client.batch_execute("BEGIN").await.expect("begin");
            let res = client.query(&*t.sql, &refs).await;
            client.batch_execute("ROLLBACK").await.expect("rollback");
            // a case named "… (PostgreSQL's error)" is passed on for the shard to refuse
            // with PostgreSQL's own SQLSTATE, as one table would
            let expect_error = case.name.contains("(PostgreSQL's error)");
            match res {
                Ok(_) if expect_error => failures.push(format!("{} / {} on {}: should fail on PostgreSQL", case.file, case.name, t.shard)),
                Ok(_) => ran += 1,
                Err(_) if expect_error => ran += 1,
                Err(e) => failures.push(format!("{} / {} on {}: {}\n  {}", case.file, case.name, t.shard, e.as_db_error().map_or(e.to_string(), |d| d.message().to_string()), t.sql)),
            }
        }
    }
    assert!(failures.is_empty(), "{} rewritten statement(s) failed on PostgreSQL:\n{}", failures.len(), failures.join("\n"));
    eprintln!("ran {ran} rewritten statements from {} routed golden cases", plans.len());
    assert!(ran >= 300, "only {ran} statements ran");
}
