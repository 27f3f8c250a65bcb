//! The benchmark's baseline: the simplest client that pages a search to its end. One request
//! at a time, it follows `rel="next"` links and reads nothing of a page but its links and how
//! many features it has (the features are skipped, not parsed into values); it stores nothing.
//! It renews its token only when refused. No client can page one stream faster.
//!
//! With `--files DIR` it also writes each feature's bytes to a file of its own in DIR
//! (`std::fs::write`, no temporary name, no database): the floor of any client that stores one
//! object per item in a local folder, as DESIGN's object layout asks.
//!
//! ```text
//! cargo run --release --example bench_baseline -- --limit 1000
//! cargo run --release --example bench_baseline -- --limit 1000 --files items
//! ```
//! Reads STAC_SYNC_API_URL, EDS_AUTH_URL, EDS_CLIENT_ID, EDS_SECRET and BENCH_COLLECTIONS (as
//! printed by the bench_api example) and prints `items seconds`.

use clap::Parser;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// Page size.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Also write each feature to a file of its own in this folder (created if missing).
    #[arg(long)]
    files: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Page {
    features: Vec<IgnoredAny>,
    #[serde(default)]
    links: Vec<Link>,
}

/// The same page, its features kept as the bytes they were received as.
#[derive(Deserialize)]
struct RawPage<'a> {
    #[serde(borrow)]
    features: Vec<&'a RawValue>,
    #[serde(default)]
    links: Vec<Link>,
}

#[derive(Deserialize)]
struct Link {
    rel: String,
    href: String,
    #[serde(default)]
    body: Option<Value>,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        eprintln!("{name} is not set (run the bench_api example and export what it prints)");
        std::process::exit(2)
    })
}

async fn token(client: &reqwest::Client) -> Result<String, String> {
    let response = client
        .post(var("EDS_AUTH_URL"))
        .basic_auth(var("EDS_CLIENT_ID"), Some(var("EDS_SECRET")))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    body["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no access_token in {body}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let client = reqwest::Client::new();
    let collections: Vec<String> = var("BENCH_COLLECTIONS")
        .split(',')
        .map(str::to_string)
        .collect();
    if let Some(dir) = &args.files {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let started = Instant::now();
    let mut bearer = token(&client).await?;
    let mut url = format!("{}search", var("STAC_SYNC_API_URL"));
    let mut body = json!({"collections": collections, "limit": args.limit});
    let mut items = 0usize;
    loop {
        let response = client
            .post(&url)
            .bearer_auth(&bearer)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            bearer = token(&client).await?;
            continue;
        }
        if !response.status().is_success() {
            return Err(format!("{url}: HTTP {}", response.status()));
        }
        let bytes = response.bytes().await.map_err(|e| e.to_string())?;
        let links = match &args.files {
            None => {
                let page: Page = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                items += page.features.len();
                page.links
            }
            Some(dir) => {
                let page: RawPage = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                for feature in page.features {
                    let path = dir.join(format!("{items}.json"));
                    std::fs::write(&path, feature.get())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    items += 1;
                }
                page.links
            }
        };
        match links.into_iter().find(|l| l.rel == "next") {
            Some(next) => {
                url = next.href;
                body = next.body.unwrap_or(Value::Null);
            }
            None => break,
        }
    }
    println!("{items} {:.3}", started.elapsed().as_secs_f64());
    Ok(())
}
