//! A local OAuth-protected STAC API for trying stac-sync by hand and for benchmarks: rustac's
//! `stac-server` (memory backend) holding N items made from the real EDS fixture items, behind
//! the tests' token layer, with short token lifetimes, an optional delay per request, and
//! random 429 / 503 answers.
//!
//! ```text
//! cargo run --release --example stac_fixture -- --items 30000 --token-ttl 20 --fault-rate 0.05
//! ```
//! It prints the environment to give stac-sync, then serves until killed.

#[path = "../tests/common/mod.rs"]
mod common;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::Parser;
use common::tokens::Issuer;
use rand::Rng;
use stac_sync::clock::ManualClock;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
struct Args {
    /// Items to serve, split over two collections (3 : 1).
    #[arg(long, default_value_t = 30_000)]
    items: usize,
    /// Lifetime of issued tokens, seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl: u64,
    /// Share of API requests answered 429 (Retry-After: 1) or 503, half each.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Delay added to every API request, milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

#[derive(Debug, Clone)]
struct Chaos {
    fault_rate: f64,
    delay: Duration,
}

async fn chaos(State(chaos): State<Chaos>, request: Request<Body>, next: Next) -> Response {
    if !chaos.delay.is_zero() {
        tokio::time::sleep(chaos.delay).await;
    }
    let roll: f64 = rand::rng().random();
    if roll < chaos.fault_rate / 2.0 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("Retry-After", "1")],
            "slow down",
        )
            .into_response();
    }
    if roll < chaos.fault_rate {
        return (StatusCode::SERVICE_UNAVAILABLE, "unavailable").into_response();
    }
    next.run(request).await
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let clock = Arc::new(ManualClock::default());
    // The token layer runs on a manual clock; here it follows real time.
    let ticker = clock.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(100));
        loop {
            interval.tick().await;
            ticker.advance(Duration::from_millis(100));
        }
    });
    let issuer = Issuer::new(clock, "fixture-client", "fixture-secret");
    issuer
        .ttl
        .store(args.token_ttl, std::sync::atomic::Ordering::SeqCst);
    let main_count = args.items * 3 / 4;
    let mut items = common::make_items("sentinel-2-l2a", main_count);
    items.extend(common::make_items(
        "sentinel-1-grd",
        args.items - main_count,
    ));
    let chaos_state = Chaos {
        fault_rate: args.fault_rate,
        delay: Duration::from_millis(args.delay_ms),
    };
    let server = common::stac::start_with(&items, issuer, args.port, move |router| {
        router.layer(axum::middleware::from_fn_with_state(chaos_state, chaos))
    })
    .await;
    println!("STAC_SYNC_API_URL={}", server.url);
    println!("EDS_AUTH_URL={}", server.token_url);
    println!("EDS_CLIENT_ID=fixture-client");
    println!("EDS_SECRET=fixture-secret");
    println!(
        "# serving {} items; token lifetime {} s; fault rate {}; delay {} ms",
        args.items, args.token_ttl, args.fault_rate, args.delay_ms
    );
    std::future::pending::<()>().await;
}
