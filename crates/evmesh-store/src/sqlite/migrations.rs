//! The node's migrations from `migrations/node`, embedded in the binary.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "log",
        include_str!("../../../../migrations/node/0001_log.sql"),
    ),
    (
        2,
        "schemas",
        include_str!("../../../../migrations/node/0002_schemas.sql"),
    ),
    (
        3,
        "delayed",
        include_str!("../../../../migrations/node/0003_delayed.sql"),
    ),
];

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<Vec<Migration>, Box<dyn std::error::Error + Send + Sync>>,
                > + Send
                + 's,
        >,
    > {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

pub(crate) async fn migrator() -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Embedded).await
}
