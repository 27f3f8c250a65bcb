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
use std::time::Duration;

#[derive(Debug, Parser)]
struct Args {
    /// Items to serve, split over two collections (3 : 1).
    #[arg(long, default_value_t = 30_000)]
    items: usize,
    /// Lifetime of issued tokens, seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl: u64,
    /// Share of API requests answered 429 (Retry-After: 1), 503, or cut off mid-body (a
    /// connection reset), a third each.
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
    if roll < chaos.fault_rate / 3.0 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("Retry-After", "1")],
            "slow down",
        )
            .into_response();
    }
    if roll < chaos.fault_rate * 2.0 / 3.0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "unavailable").into_response();
    }
    let response = next.run(request).await;
    if roll < chaos.fault_rate {
        // Half the body, then the connection dies.
        let (parts, body) = response.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
            return (StatusCode::INTERNAL_SERVER_ERROR, "unreadable body").into_response();
        };
        let half = bytes.slice(..bytes.len() / 2);
        let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> =
            vec![Ok(half), Err(std::io::Error::other("connection reset"))];
        return Response::from_parts(parts, Body::from_stream(futures_util::stream::iter(chunks)));
    }
    response
}

/// Spreads items over ten years of acquisitions (2017 to 2026), several sharing a datetime,
/// so that a job with a datetime range has yearly partitions to page in parallel.
fn spread_over_years(items: &mut [serde_json::Value]) {
    for (i, item) in items.iter_mut().enumerate() {
        if let Some(properties) = item["properties"].as_object_mut() {
            properties.remove("start_datetime");
            properties.remove("end_datetime");
            let datetime = format!(
                "{}-{:02}-{:02}T10:{:02}:00Z",
                2017 + i % 10,
                1 + (i / 10) % 12,
                1 + (i / 120) % 28,
                (i / 3360) % 60
            );
            properties.insert("datetime".into(), datetime.into());
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let issuer = Issuer::real_time("fixture-client", "fixture-secret", args.token_ttl);
    let main_count = args.items * 3 / 4;
    let mut items = common::make_items("sentinel-2-l2a", main_count);
    items.extend(common::make_items(
        "sentinel-1-grd",
        args.items - main_count,
    ));
    spread_over_years(&mut items);
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
