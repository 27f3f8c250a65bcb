//! The job's lock, and the partition leases of `run --worker`.

use super::*;

/// A worker's hold on the partitions it claims (`run --worker`, Postgres only).
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    /// The worker: its run id.
    pub owner: &'a str,
    /// How long a claim or renewal holds without the next one.
    pub ttl: std::time::Duration,
}

/// A job's single-runner lock, held until dropped.
#[derive(Debug)]
pub enum JobLock {
    /// No lock possible (an in-memory database).
    None,
    /// An OS lock on a file beside the SQLite database.
    File(std::fs::File),
    /// A Postgres session-level advisory lock, held by this connection.
    Postgres(Box<postgres::AdvisoryLock>),
}

impl JobLock {
    /// Checks that the lock is still held (a Postgres session can die under us); call before
    /// each commit.
    pub async fn check(&mut self) -> Result<(), Error> {
        match self {
            JobLock::None | JobLock::File(_) => Ok(()),
            JobLock::Postgres(lock) => lock.check().await,
        }
    }

    /// Releases the lock now (dropping it releases it too, once the server sees the
    /// connection close).
    pub async fn release(self) -> Result<(), Error> {
        match self {
            JobLock::None | JobLock::File(_) => Ok(()),
            JobLock::Postgres(lock) => lock.release().await,
        }
    }

    /// Waits for the job's planner lock (workers only: a single run holds the job alone).
    pub async fn lock_planner(&mut self) -> Result<(), Error> {
        match self {
            JobLock::None | JobLock::File(_) => Ok(()),
            JobLock::Postgres(lock) => lock.lock_planner().await,
        }
    }

    /// Releases the job's planner lock.
    pub async fn unlock_planner(&mut self) -> Result<(), Error> {
        match self {
            JobLock::None | JobLock::File(_) => Ok(()),
            JobLock::Postgres(lock) => lock.unlock_planner().await,
        }
    }
}

impl Database {
    /// Takes the job's single-runner lock, or fails with [`Error::Locked`]. Workers
    /// (`worker`) share it with each other, never with a single run; they need Postgres.
    pub async fn lock(&self, job: &str, worker: bool) -> Result<JobLock, Error> {
        match self {
            Database::Sqlite(_) if worker => Err(Error::Config(WORKERS_NEED_POSTGRES.into())),
            Database::Sqlite(db) => db.lock(job),
            Database::Postgres(db) => db.lock(job, worker).await,
        }
    }

    /// The Postgres database, for what only workers do.
    fn workers(&self) -> Result<&PostgresDb, Error> {
        match self {
            Database::Sqlite(_) => Err(Error::Config(WORKERS_NEED_POSTGRES.into())),
            Database::Postgres(db) => Ok(db),
        }
    }

    /// Claims an unfinished partition of the job's pass for a worker; see [`PostgresDb::claim`].
    pub async fn claim(
        &self,
        job: &str,
        kind: PassKind,
        lease: &Lease<'_>,
    ) -> Result<Option<Planned>, Error> {
        self.workers()?.claim(job, kind, lease).await
    }

    /// Extends a worker's leases; returns how many it still holds.
    pub async fn renew(&self, job: &str, lease: &Lease<'_>) -> Result<u64, Error> {
        self.workers()?.renew(job, lease).await
    }

    /// Gives up a worker's leases on unfinished partitions.
    pub async fn release(&self, job: &str, owner: &str) -> Result<u64, Error> {
        self.workers()?.release(job, owner).await
    }

    /// Unfinished partitions of the job's pass that `owner` does not hold.
    pub async fn unfinished_elsewhere(
        &self,
        job: &str,
        kind: PassKind,
        owner: &str,
    ) -> Result<i64, Error> {
        self.workers()?.unfinished_elsewhere(job, kind, owner).await
    }
}
