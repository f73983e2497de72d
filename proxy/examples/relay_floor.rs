//! The floor of a tokio relay: every client connection gets its own server
//! connection and bytes are copied both ways (`copy_bidirectional`), with no
//! parsing, pooling or routing. `scripts/bench_floor.sh` runs pgbench through
//! it to show what the runtime and the kernel cost per transaction before
//! shardgate does any work of its own.
//!
//! usage: relay_floor LISTEN_ADDR SERVER_ADDR [WORKERS]

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(server)) = (args.next(), args.next()) else {
        eprintln!("usage: relay_floor LISTEN_ADDR SERVER_ADDR [WORKERS]");
        std::process::exit(2);
    };
    let workers: usize = args.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    // the same runtime shardgate runs for that many threads (one: current-thread)
    let mut builder = if workers == 1 { tokio::runtime::Builder::new_current_thread() } else { tokio::runtime::Builder::new_multi_thread() };
    if workers > 1 {
        builder.worker_threads(workers);
    }
    builder.enable_all().build()?.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        println!("{}", listener.local_addr()?);
        loop {
            let (mut client, _) = listener.accept().await?;
            let server = server.clone();
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(&server).await else { return };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    })
}
