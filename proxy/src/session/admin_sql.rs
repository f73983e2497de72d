//! Admin commands on the Postgres port, for users with `admin = true`, in
//! pgbouncer's style: `SHOW SHARDS`, `SHOW POOLS`, `SHOW CLIENTS`,
//! `SHOW MONTHS`, `SHOW FALLBACK`, `SHOW MIGRATION`. Answered by the proxy; other users' SHOW goes to the server.

use bytes::BytesMut;

use super::Session;
use crate::backend::Pool;
use crate::protocol::backend as msg;
use crate::protocol::codec::{put_cstr, put_message};

/// Writes a text result: RowDescription, DataRows, CommandComplete `SHOW`.
fn put_table(out: &mut BytesMut, cols: &[&str], rows: &[Vec<String>]) {
    put_message(out, b'T', |o| {
        o.extend_from_slice(&(cols.len() as i16).to_be_bytes());
        for c in cols {
            put_cstr(o, c.as_bytes());
            o.extend_from_slice(&0i32.to_be_bytes()); // table oid
            o.extend_from_slice(&0i16.to_be_bytes()); // attnum
            o.extend_from_slice(&25u32.to_be_bytes()); // text
            o.extend_from_slice(&(-1i16).to_be_bytes());
            o.extend_from_slice(&(-1i32).to_be_bytes());
            o.extend_from_slice(&0i16.to_be_bytes());
        }
    });
    for r in rows {
        let row: Vec<Option<bytes::Bytes>> = r.iter().map(|v| Some(bytes::Bytes::copy_from_slice(v.as_bytes()))).collect();
        crate::routed::merge::put_data_row(out, &row, row.len());
    }
    put_message(out, b'C', |o| put_cstr(o, b"SHOW"));
}

fn pool_row(name: &str, p: &Pool) -> Vec<String> {
    let s = p.status();
    vec![
        name.to_string(),
        s.max_size.to_string(),
        s.size.to_string(),
        s.available.to_string(),
        (s.size - s.available.min(s.size)).to_string(),
        s.waiting.to_string(),
    ]
}

impl Session {
    /// Answers an admin command; `false` when `sql` is not one.
    pub(super) async fn admin_command(&mut self, sql: &[u8]) -> Result<bool, super::End> {
        if !self.admin || sql.len() > 64 {
            return Ok(false);
        }
        let text = String::from_utf8_lossy(sql).trim().trim_end_matches(';').trim().to_ascii_lowercase();
        let words: Vec<&str> = text.split_whitespace().collect();
        let ["show", what] = words.as_slice() else {
            return Ok(false);
        };
        if !matches!(*what, "shards" | "pools" | "clients" | "months" | "fallback" | "migration") {
            return Ok(false);
        }
        self.barrier().await?;
        let engine = self.shared.engine.clone();
        let mut out = BytesMut::new();
        match *what {
            "shards" => {
                let months = engine.months();
                let rows: Vec<Vec<String>> = self
                    .shared
                    .config
                    .shard_dsns()
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let s = engine.shards[i].status();
                        let h = &engine.health[i];
                        vec![
                            i.to_string(),
                            d.dbname.clone(),
                            d.host.clone(),
                            d.port.to_string(),
                            h.state().name().to_string(),
                            format!("{:.2}", h.latency().as_secs_f64() * 1000.0),
                            h.failures().to_string(),
                            s.size.to_string(),
                            s.available.to_string(),
                            months.len().to_string(),
                        ]
                    })
                    .collect();
                put_table(&mut out, &["shard", "database", "host", "port", "state", "probe_ms", "failures", "server_connections", "idle_connections", "month_tables"], &rows);
            }
            "pools" => {
                let mut rows = vec![pool_row(&self.shared.config.default_dsn().dbname, &self.shared.pool)];
                for (i, p) in engine.shards.iter().enumerate() {
                    rows.push(pool_row(&format!("db_{i}"), p));
                }
                put_table(&mut out, &["database", "max_size", "size", "idle", "active", "waiting"], &rows);
            }
            "clients" => {
                let rows: Vec<Vec<String>> = self
                    .shared
                    .sessions
                    .lock()
                    .map(|m| {
                        let mut v: Vec<_> = m.iter().map(|(id, c)| vec![id.to_string(), c.user.clone(), c.addr.clone(), c.connected.to_string()]).collect();
                        v.sort_by_key(|r| r[0].parse::<u64>().unwrap_or(0));
                        v
                    })
                    .unwrap_or_default();
                put_table(&mut out, &["id", "user", "addr", "connected_at"], &rows);
            }
            "months" => {
                let rows: Vec<Vec<String>> = engine
                    .months()
                    .iter()
                    .flat_map(|m| engine.topology().tables.iter().map(move |t| vec![m.suffix(), t.name.clone(), t.physical(*m)]))
                    .collect();
                put_table(&mut out, &["month", "table", "physical_table"], &rows);
            }
            "fallback" => {
                let rows: Vec<Vec<String>> = (0..engine.shards.len())
                    .map(|i| {
                        let last = engine.fallback.last_sync_ms(i);
                        vec![
                            format!("db_{i}"),
                            engine.health[i].state().name().to_string(),
                            (engine.fallback.pending(i) - engine.fallback.failed(i)).to_string(),
                            engine.fallback.failed(i).to_string(),
                            if last > 0 { jiff::Timestamp::from_millisecond(last).map(|t| t.to_string()).unwrap_or_default() } else { String::new() },
                        ]
                    })
                    .collect();
                put_table(&mut out, &["database", "state", "pending_rows", "failed_rows", "last_sync"], &rows);
            }
            "migration" => {
                let m = &engine.migration;
                let st = m.status();
                let phase = if m.enabled { m.phase().map_or("unknown", |p| p.name()).to_string() } else { "none (no legacy_db configured)".into() };
                let opt = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_default();
                let row = vec![
                    phase,
                    opt(st.as_ref().map(|s| s.backfill_rows)),
                    opt(st.as_ref().and_then(|s| s.backfill_total)),
                    st.as_ref().map(|s| s.backfill_done.to_string()).unwrap_or_default(),
                    opt(st.as_ref().map(|s| s.outbox_pending)),
                    st.as_ref().and_then(|s| s.verify_at.clone()).unwrap_or_default(),
                    opt(st.as_ref().and_then(|s| s.verify_differences)),
                    m.proxy_id.clone(),
                ];
                put_table(
                    &mut out,
                    &["phase", "backfill_rows", "backfill_total", "backfill_done", "outbox_pending", "last_verify_at", "last_verify_differences", "proxy"],
                    &[row],
                );
            }
            _ => return Ok(false),
        }
        self.cout.extend_from_slice(&out);
        let status = if self.db.server.is_some() { self.tx_status } else { b'I' };
        msg::ready_for_query(&mut self.cout, status);
        Ok(true)
    }
}
