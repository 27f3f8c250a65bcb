//! Delivering the change feed to a webhook (`webhook_url`): the changes after the webhook's
//! stored cursor, one POST of JSON per batch (a committed page's worth while a run keeps up),
//! retried with the API's retry policy. The cursor moves only after a 2xx, so delivery is at
//! least once: a receiver dedupes on `seq`. A failed delivery never stops the mirror; the next
//! run delivers from the cursor again.

use crate::config::{Config, RetryPolicy};
use crate::error::{Error, HttpError};
use crate::mirror::db::Database;
use crate::stac::http::{self, Attempts, BuildWith, Stats};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use url::Url;

/// Changes in one POST at most.
const PER_POST: i64 = 1000;

/// The webhook of a run.
#[derive(Debug)]
pub struct Webhook {
    url: Url,
    shown: String,
    client: reqwest::Client,
    retry: RetryPolicy,
    stats: Stats,
    /// Poked after each commit.
    wake: Notify,
    /// One delivery at a time (a run's follower and a job's last delivery).
    busy: tokio::sync::Mutex<()>,
}

impl Webhook {
    /// The config's webhook, if it has one.
    pub fn of(config: &Config) -> Result<Option<Webhook>, Error> {
        let Some(url) = config.webhook_url.clone() else {
            return Ok(None);
        };
        let client = http::client(&config.http)
            .map_err(|e| Error::Config(format!("webhook_url: cannot build a client: {e}")))?;
        Ok(Some(Webhook {
            shown: http::display_url(&url),
            url,
            client,
            retry: config.http.retry.clone(),
            stats: Stats::default(),
            wake: Notify::new(),
            busy: tokio::sync::Mutex::new(()),
        }))
    }

    /// Something was committed: deliver soon.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Delivers as commits happen until `done`, then what is left; a failure is logged and
    /// ends this run's deliveries (the cursor stays for the next run).
    pub async fn follow(&self, db: &Database, done: &CancellationToken) {
        loop {
            let finished = done.is_cancelled();
            if let Err(e) = self.deliver(db).await {
                tracing::warn!(webhook = %self.shown, error = %e,
                    "could not deliver the change feed to the webhook; the next run tries again \
                     from where it stopped");
                return;
            }
            if finished {
                return;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = done.cancelled() => {}
            }
        }
    }

    /// Delivers every change after the webhook's cursor; how many.
    pub async fn deliver(&self, db: &Database) -> Result<u64, Error> {
        let _one = self.busy.lock().await;
        let mut delivered = 0;
        loop {
            let cursor = db.webhook_cursor(self.url.as_str()).await?;
            let changes = db.changes(cursor, PER_POST).await?;
            let Some(last) = changes.last().map(|c| c.seq) else {
                return Ok(delivered);
            };
            let body = serde_json::json!({"changes": changes});
            let mut attempts = Attempts::new(
                "webhook delivery",
                &self.shown,
                &self.retry,
                &self.stats,
                undelivered,
            );
            let mut build = BuildWith(|| self.client.post(self.url.clone()).json(&body));
            let sent = http::send(&mut attempts, None, &mut build).await?;
            let status = sent.response.status();
            if !status.is_success() {
                return Err(Error::Upstream(format!(
                    "webhook {}: HTTP {status} for changes {} to {last}",
                    self.shown,
                    cursor + 1
                )));
            }
            db.set_webhook_cursor(self.url.as_str(), last).await?;
            delivered += changes.len() as u64;
        }
    }
}

fn undelivered(source: HttpError) -> Error {
    Error::Unavailable {
        source,
        advice: "the webhook did not take the changes; the next run delivers them again",
    }
}
