//! A reference point for bench/compare.sh: the smallest tokio TCP proxy (accept, connect,
//! `copy_bidirectional`), on the same runtime settings as wsgate. It understands nothing of
//! WebSocket, so it shows what the runtime and two sockets cost before any relay work.
//!
//! Usage: cargo run --release --example byte_proxy -- <listen addr> <upstream addr>

use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: byte_proxy <listen addr> <upstream addr>");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(&listen).await?;
    loop {
        let (mut client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Ok(mut up) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
        });
    }
}
