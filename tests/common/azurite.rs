//! A real Azure Blob API for tests: Azurite (npm package, installed in tests/azurite by
//! .ci/run) on a free loopback port, stopped when dropped.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use std::collections::BTreeMap;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Azurite's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known development key (public, documented by Microsoft).
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    pub endpoint: String,
    child: Child,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Azurite {
    pub fn start() -> Azurite {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let binary = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/azurite/node_modules/.bin/azurite-blob"
        );
        let child = Command::new(binary)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args([
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Azurite is installed (npm ci --prefix tests/azurite; .ci/run does it)");
        let azurite = Azurite {
            endpoint: format!("http://127.0.0.1:{port}/{ACCOUNT}"),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Azurite did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        azurite
    }

    /// Creates a container with a Shared Key signed request (Azure Storage's own auth).
    pub async fn create_container(&self, container: &str) {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"
        );
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&STANDARD.decode(KEY).expect("key"))
            .expect("hmac key");
        mac.update(to_sign.as_bytes());
        let signature = STANDARD.encode(mac.finalize().into_bytes());
        let response = reqwest::Client::new()
            .put(format!("{}/{container}?restype=container", self.endpoint))
            .header("x-ms-date", date)
            .header("x-ms-version", version)
            .header("Authorization", format!("SharedKey {ACCOUNT}:{signature}"))
            .header("Content-Length", "0")
            .send()
            .await
            .expect("Azurite answers");
        assert!(
            response.status().is_success(),
            "create container: {}",
            response.status()
        );
    }

    /// The `[object_store]` options a user would give for this account.
    pub fn toml(&self) -> String {
        let options: BTreeMap<&str, &str> = [
            ("azure_storage_account_name", ACCOUNT),
            ("azure_storage_account_key", KEY),
            ("azure_storage_endpoint", self.endpoint.as_str()),
            ("azure_allow_http", "true"),
        ]
        .into_iter()
        .collect();
        let mut text = String::from("[object_store]\n");
        for (k, v) in options {
            text.push_str(&format!("{k} = \"{v}\"\n"));
        }
        text
    }
}
