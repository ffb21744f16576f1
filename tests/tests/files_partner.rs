//! A files partner notices added, changed and deleted files by itself.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::path::Path;
use std::time::Duration;

use meshgate_connectors::Connector;
use meshgate_connectors::files::FilesConnector;
use meshgate_schema::StudyQuery;
use meshgate_tests::SyntheticPartner;

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

async fn count_becomes(connector: &FilesConnector, expected: usize) {
    for _ in 0..100 {
        if connector
            .search(&StudyQuery::default())
            .await
            .unwrap()
            .studies
            .len()
            == expected
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let found = connector
        .search(&StudyQuery::default())
        .await
        .unwrap()
        .studies
        .len();
    panic!("expected {expected} studies, the index still has {found}");
}

#[tokio::test]
async fn a_files_partner_picks_up_added_and_deleted_studies_without_a_restart() {
    let source = SyntheticPartner::new("folder", 6, 10);
    let watched = tempfile::tempdir().unwrap();
    let studies: Vec<_> = std::fs::read_dir(source.dicom_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let (first, rest) = studies.split_at(2);
    for study in first {
        copy_tree(study, &watched.path().join(study.file_name().unwrap()));
    }
    // Junk next to the DICOM files is skipped, not fatal.
    std::fs::write(watched.path().join("README.txt"), "not DICOM").unwrap();

    let connector = FilesConnector::open(watched.path().to_owned(), Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(
        connector
            .search(&StudyQuery::default())
            .await
            .unwrap()
            .studies
            .len(),
        2
    );

    for study in rest {
        copy_tree(study, &watched.path().join(study.file_name().unwrap()));
    }
    count_becomes(&connector, 6).await;

    std::fs::remove_dir_all(watched.path().join(first[0].file_name().unwrap())).unwrap();
    count_becomes(&connector, 5).await;

    let mut found = connector
        .search(&StudyQuery::default())
        .await
        .unwrap()
        .studies;
    connector.load_series(&mut found).await.unwrap();
    let instances: u32 = found.iter().map(|s| s.number_of_instances.unwrap()).sum();
    let expected: u32 = source
        .manifest
        .iter()
        .filter(|row| found.iter().any(|s| s.uid == row.study_uid))
        .map(|row| row.number_of_instances)
        .sum();
    assert_eq!(instances, expected);
}
