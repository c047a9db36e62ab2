//! SQLite's errors as the store's: a damaged page or a file that is not a database
//! is data loss; anything else is the backend failing on the request. The only place
//! that knows SQLite's error types.

use crate::StoreError;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        const CORRUPT: &str = "11";
        const NOT_A_DATABASE: &str = "26";
        let damaged = match &e {
            sqlx::Error::Database(db) => {
                matches!(db.code().as_deref(), Some(CORRUPT | NOT_A_DATABASE))
            }
            _ => false,
        };
        if damaged {
            StoreError::DataLoss(format!("database: {e}"))
        } else {
            StoreError::Backend(Box::new(e))
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let damaged = matches!(
            &e,
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        );
        if damaged {
            StoreError::DataLoss(format!("database: {e}"))
        } else {
            StoreError::Backend(Box::new(e))
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_database_is_data_loss_and_other_failures_are_the_backend() {
        let failure = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        for code in [rusqlite::ffi::SQLITE_CORRUPT, rusqlite::ffi::SQLITE_NOTADB] {
            let e = StoreError::from(failure(code));
            assert!(e.is_corruption(), "{e}");
            assert!(matches!(e, StoreError::DataLoss(_)));
        }
        for e in [
            StoreError::from(failure(rusqlite::ffi::SQLITE_BUSY)),
            StoreError::from(sqlx::Error::PoolTimedOut),
        ] {
            assert!(!e.is_corruption(), "{e}");
            assert!(matches!(e, StoreError::Backend(_)));
            assert!(e.to_string().starts_with("storage: "), "{e}");
        }
    }
}
