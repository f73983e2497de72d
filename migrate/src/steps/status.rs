//! `status`: phase, backfill progress, outbox depth, last verify, proxies.

use tokio_postgres::Client;

use crate::state::{self, State};

/// Human-readable status lines.
pub fn render(st: &State) -> String {
    let mut s = format!("phase:     {}{}\n", st.effective_phase(), if st.phase.is_none() { " (no migration started)" } else { "" });
    let total = st.backfill_total.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
    let pct = match st.backfill_total {
        Some(t) if t > 0 => format!(" ({:.1}%)", 100.0 * st.backfill_rows as f64 / t as f64),
        _ => String::new(),
    };
    s.push_str(&format!(
        "backfill:  {} rows of {total}{pct}, {}{}\n",
        st.backfill_rows,
        if st.backfill_done { "done" } else { "not finished" },
        st.checkpoint.map(|c| format!(", checkpoint merchant_id {c}")).unwrap_or_default()
    ));
    s.push_str(&format!("outbox:    {} pending\n", st.outbox_pending));
    s.push_str(&match (&st.verify_at, st.verify_differences) {
        (Some(at), Some(d)) => format!("verify:    {at}: {} rows compared, {d} difference(s){}\n", st.verify_rows.unwrap_or(0), if st.verify_after_backfill { "" } else { " (before the backfill finished)" }),
        _ => "verify:    never run\n".into(),
    });
    s
}

/// Prints the status; `proxies` lists what each proxy follows.
pub async fn run(c: &Client) -> anyhow::Result<()> {
    let st = state::load(c).await?;
    print!("{}", render(&st));
    if state::exists(c).await? {
        let rows = c
            .query("SELECT proxy, phase, epoch, round(extract(epoch FROM now() - seen_at)::numeric, 1)::text FROM shardgate_migration_proxies ORDER BY 1", &[])
            .await?;
        for r in rows {
            let (p, ph, e, ago): (String, String, i64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
            println!("proxy:     {p} follows {ph} (epoch {e}, seen {ago} s ago)");
        }
    }
    Ok(())
}
