// `sqlx::migrate!` embeds the migrations when the crate compiles; without this a new migration
// file would not rebuild it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
