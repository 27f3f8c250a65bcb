//! The real services some tests talk to, and what a test does when one is missing.
//!
//! Under `scripts/test` (and so in CI), which installs and starts them, `STAC_SYNC_TEST_SERVICES`
//! is `required`: a missing service fails its tests. A contributor's plain `cargo test` runs
//! every test that needs none of them, and skips the others, saying once per test binary which
//! service was missing and that `scripts/test` runs them.

use std::io::Write as _;
use std::sync::{Mutex, PoisonError};

/// A service that tests start or connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// PostgreSQL on 127.0.0.1:5432, or `STAC_SYNC_TEST_POSTGRES`.
    Postgres,
    /// `moto_server` on the PATH (an S3 API).
    Moto,
    /// Azurite (the Azure Blob emulator), from `tests/azurite`.
    Azurite,
    /// Prometheus's Pushgateway, `/usr/bin/prometheus-pushgateway` or
    /// `STAC_SYNC_TEST_PUSHGATEWAY`.
    Pushgateway,
    /// pgstac: PostGIS in the Postgres server and `pypgstac` on the PATH, to `pypgstac migrate`
    /// a fresh database; stac-fastapi-pgstac to serve it.
    Pgstac,
}

impl Service {
    fn present(self) -> bool {
        match self {
            Service::Postgres => {
                let server = super::postgres_server();
                let address = url::Url::parse(&server).ok().and_then(|url| {
                    Some(format!(
                        "{}:{}",
                        url.host_str()?,
                        url.port().unwrap_or(5432)
                    ))
                });
                address.is_some_and(|address| {
                    address
                        .parse()
                        .ok()
                        .and_then(|socket| {
                            std::net::TcpStream::connect_timeout(
                                &socket,
                                std::time::Duration::from_secs(2),
                            )
                            .ok()
                        })
                        .is_some()
                })
            }
            Service::Moto => on_path("moto_server"),
            Service::Pgstac => Service::Postgres.present() && on_path("pypgstac"),
            Service::Azurite => std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/azurite/node_modules/.bin/azurite-blob"
            ))
            .exists(),
            Service::Pushgateway => std::path::Path::new(
                &std::env::var("STAC_SYNC_TEST_PUSHGATEWAY")
                    .unwrap_or_else(|_| "/usr/bin/prometheus-pushgateway".into()),
            )
            .exists(),
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).exists()))
}

/// Whether the calling test must stop here: `service` is missing and this is not a run of
/// `scripts/test` (where a missing service is a failure, so the test goes on and fails).
pub fn skip_without(service: Service) -> bool {
    if std::env::var("STAC_SYNC_TEST_SERVICES").as_deref() == Ok("required") || service.present() {
        return false;
    }
    static SAID: Mutex<Vec<Service>> = Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
    if !said.contains(&service) {
        said.push(service);
        // Straight to stderr: the test harness captures `eprintln!` of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "note: skipping the tests of this binary that need {service:?} (not found here); \
             `scripts/test` installs and starts every service and runs them all"
        );
    }
    true
}
