//! A partner whose imaging data is a folder of DICOM Part-10 files.
//!
//! The folder is indexed by reading each file's header (stopping before the
//! pixel data) and answered from that index. A background task re-scans the
//! folder at an interval and re-reads only files whose size or modification
//! time changed, so added, changed and deleted files show up by themselves.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use dicom_dictionary_std::tags::PIXEL_DATA;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use meshgate_schema::dicom::{DicomAttributes, Tag};
use meshgate_schema::{
    Capabilities, ConnectorKind, FilterKind, Instance, PagingStyle, Series, Study, StudyQuery,
};

use crate::kind::{self, ConnectorConfig, Invalid, Kind, Setting};
use crate::{Connector, ConnectorError, SearchOutcome};

/// A folder of DICOM files.
#[derive(Debug)]
pub struct FilesConnector {
    index: Arc<RwLock<Arc<FolderIndex>>>,
}

/// What one file contributed, with what is needed to notice it changed.
#[derive(Debug, Clone)]
struct IndexedFile {
    modified: Option<SystemTime>,
    len: u64,
    /// `None` for files that are not readable DICOM.
    content: Option<Arc<FileHeader>>,
}

#[derive(Debug)]
struct FileHeader {
    study: Study,
    series: Series,
    instance: Instance,
}

/// A study's first-seen header and its series' headers with their instances.
type StudyGroup<'a> = (&'a Study, BTreeMap<&'a str, (&'a Series, Vec<Instance>)>);

/// The folder as last scanned.
#[derive(Debug, Default)]
struct FolderIndex {
    root: PathBuf,
    files: HashMap<PathBuf, IndexedFile>,
    studies: Vec<Study>,
    by_uid: HashMap<String, usize>,
}

/// A parsed data set, read through the domain's attribute accessors.
struct Dataset<'a>(&'a InMemDicomObject);

/// `kind = "files"`: a folder of DICOM Part-10 files.
pub const KIND: Kind = Kind {
    name: "files",
    read: FilesConfig::read,
};

/// A files partner's table.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// The folder (relative: to the configuration file's folder).
    pub path: PathBuf,
    /// How often the folder is checked for changed files.
    #[serde(default = "default_rescan_ms")]
    pub rescan_interval_ms: u64,
}

fn default_rescan_ms() -> u64 {
    2_000
}

impl FilesConfig {
    fn read(
        table: toml::Value,
        setting: &dyn Setting,
    ) -> Result<Box<dyn ConnectorConfig>, Invalid> {
        let mut config: FilesConfig = kind::typed(table)?;
        config.path = setting.path(&config.path);
        Ok(Box::new(config))
    }
}

#[async_trait]
impl ConnectorConfig for FilesConfig {
    async fn build(&self) -> Result<Arc<dyn Connector>, ConnectorError> {
        let rescan = Duration::from_millis(self.rescan_interval_ms.max(100));
        Ok(Arc::new(
            FilesConnector::open(self.path.clone(), rescan).await?,
        ))
    }
}

impl DicomAttributes for Dataset<'_> {
    fn texts(&self, tag: Tag) -> Vec<String> {
        let Ok(Some(element)) = self.0.element_opt(dicom_core::Tag(tag.0, tag.1)) else {
            return Vec::new();
        };
        match element.to_multi_str() {
            Ok(values) => values
                .iter()
                .map(|v| {
                    v.trim_matches(|c: char| c.is_whitespace() || c == '\0')
                        .to_owned()
                })
                .filter(|v| !v.is_empty())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl FilesConnector {
    /// Indexes `root` and keeps the index fresh every `rescan_interval`.
    /// Fails if the folder cannot be read at all.
    pub async fn open(
        root: PathBuf,
        rescan_interval: Duration,
    ) -> Result<FilesConnector, ConnectorError> {
        let empty = Arc::new(FolderIndex {
            root: root.clone(),
            ..FolderIndex::default()
        });
        let first = tokio::task::spawn_blocking(move || FolderIndex::rescan(&empty))
            .await
            .map_err(|_| ConnectorError::Storage("the indexing task failed".into()))??;
        let index = Arc::new(RwLock::new(Arc::new(first)));
        tokio::spawn(keep_fresh(Arc::downgrade(&index), rescan_interval));
        Ok(FilesConnector { index })
    }

    fn snapshot(&self) -> Arc<FolderIndex> {
        current(&self.index)
    }
}

/// The index as it stands now.
fn current(index: &RwLock<Arc<FolderIndex>>) -> Arc<FolderIndex> {
    match index.read() {
        Ok(guard) => Arc::clone(&guard),
        Err(poisoned) => Arc::clone(&poisoned.into_inner()),
    }
}

async fn rescan_into(index: &RwLock<Arc<FolderIndex>>) -> Result<(), ConnectorError> {
    let now = current(index);
    let next = tokio::task::spawn_blocking(move || FolderIndex::rescan(&now))
        .await
        .map_err(|_| ConnectorError::Storage("the indexing task failed".into()))??;
    match index.write() {
        Ok(mut guard) => *guard = Arc::new(next),
        Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
    }
    Ok(())
}

async fn keep_fresh(index: Weak<RwLock<Arc<FolderIndex>>>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(index) = index.upgrade() else { return };
        if let Err(error) = rescan_into(&index).await {
            tracing::warn!(%error, "re-scanning a files partner failed; keeping the previous index");
        }
    }
}

impl FolderIndex {
    /// A new index of the same folder, re-reading only changed files.
    fn rescan(previous: &FolderIndex) -> Result<FolderIndex, ConnectorError> {
        let mut paths = Vec::new();
        walk(&previous.root, &mut paths)
            .map_err(|_| ConnectorError::Storage("the folder cannot be listed".into()))?;
        let mut files = HashMap::with_capacity(paths.len());
        let mut unreadable = 0usize;
        for (path, len, modified) in paths {
            let entry = match previous.files.get(&path) {
                Some(known) if known.len == len && known.modified == modified => known.clone(),
                _ => IndexedFile {
                    modified,
                    len,
                    content: read_header(&path).map(Arc::new),
                },
            };
            if entry.content.is_none() {
                unreadable += 1;
            }
            files.insert(path, entry);
        }
        if unreadable > 0 {
            tracing::warn!(
                unreadable,
                "files in a files partner's folder are not readable DICOM"
            );
        }
        let mut index = FolderIndex {
            root: previous.root.clone(),
            files,
            ..FolderIndex::default()
        };
        index.build_studies();
        Ok(index)
    }

    fn build_studies(&mut self) {
        let mut studies: BTreeMap<&str, StudyGroup<'_>> = BTreeMap::new();
        for header in self.files.values().filter_map(|f| f.content.as_deref()) {
            let (_, series) = studies
                .entry(header.study.uid.as_str())
                .or_insert_with(|| (&header.study, BTreeMap::new()));
            let (_, instances) = series
                .entry(header.series.uid.as_str())
                .or_insert_with(|| (&header.series, Vec::new()));
            instances.push(header.instance.clone());
        }
        self.studies = studies
            .into_values()
            .map(|(study, series)| {
                let mut study = study.clone();
                study.set_series(
                    series
                        .into_values()
                        .map(|(series, instances)| Series {
                            number_of_instances: u32::try_from(instances.len()).ok(),
                            instances,
                            ..series.clone()
                        })
                        .collect(),
                );
                study
            })
            .collect();
        self.by_uid = self
            .studies
            .iter()
            .enumerate()
            .map(|(i, s)| (s.uid.clone(), i))
            .collect();
    }
}

/// Regular files below `dir`, with size and modification time; hidden
/// entries are skipped.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), out)?;
        } else if kind.is_file() {
            let meta = entry.metadata()?;
            out.push((entry.path(), meta.len(), meta.modified().ok()));
        }
    }
    Ok(())
}

fn read_header(path: &Path) -> Option<FileHeader> {
    let object = OpenFileOptions::new()
        .read_until(PIXEL_DATA)
        .open_file(path)
        .ok()?;
    let dataset = &Dataset(&object);
    let mut study = Study::from_attributes(dataset)?;
    let mut series = Series::from_attributes(dataset)?;
    let instance = Instance::from_attributes(dataset)?;
    if study.modalities.is_empty() {
        study.modalities = series.modality.iter().cloned().collect();
    }
    series.number_of_instances = None;
    Some(FileHeader {
        study,
        series,
        instance,
    })
}

#[async_trait]
impl Connector for FilesConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Files
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::declared(FilterKind::ALL.to_vec(), PagingStyle::None, None, None)
    }

    async fn search(&self, query: &StudyQuery) -> Result<SearchOutcome, ConnectorError> {
        let index = self.snapshot();
        let studies = index
            .studies
            .iter()
            .filter(|study| query.matches(study))
            .map(|study| Study {
                series: Vec::new(),
                ..study.clone()
            })
            .collect();
        Ok(SearchOutcome {
            studies,
            truncated: false,
        })
    }

    async fn check(&self) -> Result<Duration, ConnectorError> {
        let started = std::time::Instant::now();
        let root = self.snapshot().root.clone();
        let unreadable = |e: std::io::Error| ConnectorError::Storage(e.kind().to_string());
        let mut entries = tokio::fs::read_dir(&root).await.map_err(unreadable)?;
        entries.next_entry().await.map_err(unreadable)?;
        Ok(started.elapsed())
    }

    async fn load_series(&self, studies: &mut [Study]) -> Result<(), ConnectorError> {
        let index = self.snapshot();
        for study in studies {
            if let Some(found) = index
                .by_uid
                .get(&study.uid)
                .and_then(|i| index.studies.get(*i))
            {
                study.clone_from(found);
            }
        }
        Ok(())
    }
}
