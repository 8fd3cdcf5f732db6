//! Where the lake lives: a local directory or an S3 bucket and prefix.
//!
//! [`LakeLocation`] gives every part of the lake the same view: an object store rooted
//! at the lake (data files, manifests, window state), the lake's URL and the storage
//! options for delta-rs (the Delta logs), and the local directory when there is one
//! (fsyncs, temporary-file cleanup, the layout conversion). Credentials for S3 come
//! from the standard AWS chain (environment, profile, instance role) and are never part
//! of the options logged or shown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use url::Url;

use crate::{Error, Result};

/// How to reach an S3-compatible store (`[lake.s3]`).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// The region; the AWS chain's (or `us-east-1`) when `None`.
    pub region: Option<String>,
    /// An endpoint other than AWS's (a local server such as SeaweedFS or MinIO).
    pub endpoint: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted ones.
    pub path_style: bool,
    /// Allow `http://` endpoints.
    pub allow_http: bool,
}

/// The lake's root (see the module docs).
#[derive(Clone)]
pub struct LakeLocation {
    url: Url,
    store: Arc<dyn ObjectStore>,
    options: HashMap<String, String>,
    local: Option<PathBuf>,
}

impl std::fmt::Debug for LakeLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeLocation")
            .field("url", &self.url.as_str())
            .finish()
    }
}

fn refused(message: String) -> Error {
    Error::Refused(message)
}

impl LakeLocation {
    /// A local directory (created if missing), or `s3://bucket/prefix` with `s3`.
    pub fn open(dir: &Path, s3: &S3Options) -> Result<Self> {
        let text = dir.to_string_lossy();
        if let Some(rest) = text.strip_prefix("s3://") {
            return Self::s3(rest, s3);
        }
        Self::local(dir)
    }

    /// A lake on a local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let abs = std::fs::canonicalize(dir).map_err(io)?;
        let url = Url::from_directory_path(&abs)
            .map_err(|()| refused(format!("{} is not a directory path", abs.display())))?;
        let store = LocalFileSystem::new_with_prefix(&abs).map_err(|source| Error::Store {
            path: abs.display().to_string(),
            source,
        })?;
        Ok(Self {
            url,
            store: Arc::new(store),
            options: HashMap::new(),
            local: Some(abs),
        })
    }

    fn s3(rest: &str, s3: &S3Options) -> Result<Self> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(refused(format!(
                "lake.dir \"s3://{rest}\" names no bucket (s3://bucket/prefix)"
            )));
        }
        let region = s3.region.clone().unwrap_or_else(|| "us-east-1".to_owned());
        let mut options = HashMap::from([
            ("AWS_REGION".to_owned(), region.clone()),
            (
                "AWS_VIRTUAL_HOSTED_STYLE_REQUEST".to_owned(),
                (!s3.path_style).to_string(),
            ),
            ("AWS_ALLOW_HTTP".to_owned(), s3.allow_http.to_string()),
        ]);
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_virtual_hosted_style_request(!s3.path_style)
            .with_allow_http(s3.allow_http);
        if let Some(endpoint) = &s3.endpoint {
            builder = builder.with_endpoint(endpoint);
            options.insert("AWS_ENDPOINT_URL".to_owned(), endpoint.clone());
        }
        let bucket_store = builder.build().map_err(|source| Error::Store {
            path: format!("s3://{bucket}"),
            source,
        })?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(bucket_store)
        } else {
            Arc::new(PrefixStore::new(bucket_store, prefix))
        };
        let url = if prefix.is_empty() {
            format!("s3://{bucket}/")
        } else {
            format!("s3://{bucket}/{prefix}/")
        };
        let url = Url::parse(&url).map_err(|e| refused(format!("lake.dir {url:?}: {e}")))?;
        Ok(Self {
            url,
            store,
            options,
            local: None,
        })
    }

    /// The lake's URL (a directory: ends in `/`).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The object store rooted at the lake.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Storage options for delta-rs (no secrets: those come from the AWS chain).
    pub fn options(&self) -> &HashMap<String, String> {
        &self.options
    }

    /// The local directory, for a lake on local disk.
    pub fn local_dir(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    /// The lake's table names: directories (not `_`-prefixed) holding a Delta log.
    pub async fn tables(&self) -> Result<Vec<String>> {
        let list = |path: Option<ObjectPath>| {
            let store = self.store.clone();
            async move {
                store
                    .list_with_delimiter(path.as_ref())
                    .await
                    .map_err(|source| Error::Store {
                        path: path.map(|p| p.to_string()).unwrap_or_default(),
                        source,
                    })
            }
        };
        let mut names = Vec::new();
        for dir in list(None).await?.common_prefixes {
            let Some(name) = dir.filename().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('_') || name.starts_with('.') {
                continue;
            }
            let log = dir.clone().join("_delta_log");
            let has_log = list(Some(dir)).await?.common_prefixes.contains(&log);
            if has_log {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}
