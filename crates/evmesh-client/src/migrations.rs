//! The client's tables (`migrations/client`), embedded, applied to the service's
//! database by a consumer at start. They are tracked in a table of their own,
//! `evmesh_client_migrations`, so that they never collide with the service's own
//! migrations (sqlx's `_sqlx_migrations` included).

use sqlx::SqlitePool;

const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    include_str!("../../../migrations/client/0001_inbox_outbox.sql"),
)];

pub(crate) async fn run(pool: &SqlitePool) -> crate::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS evmesh_client_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    for &(version, sql) in MIGRATIONS {
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT version FROM evmesh_client_migrations WHERE version = ?")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
        if applied.is_none() {
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO evmesh_client_migrations (version, applied_at) VALUES (?, unixepoch() * 1000)")
                .bind(version)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
