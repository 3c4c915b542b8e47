//! Contract history in the repository, checked without a registry.
//!
//! ```text
//! schemas/avro/<namespace>/<Name>.avsc          the contract as this build writes it
//! schemas/published/<namespace>.<Name>/vN.avsc  every version ever published, never edited
//! schemas/compatibility.json                    the level each record evolves under
//! ```
//!
//! [`check`] passes when every published history is consistent under its level (each version
//! compatible with those before it, as the registry would have required) and every contract
//! equals its latest published version. A changed contract fails with what to do: publish it
//! ([`publish`], `keel schema publish`) if it is compatible, or the rules it breaks if not. So
//! a breaking change cannot reach `main` and an unpublished one cannot ship.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::registry::compat::{self, Level};
use crate::registry::store;

/// The levels file: a default and per-record overrides.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelsFile {
    default: String,
    #[serde(default)]
    records: BTreeMap<String, String>,
}

/// Compatibility levels per record full name.
#[derive(Debug, Clone)]
pub struct Levels {
    pub default: Level,
    pub records: BTreeMap<String, Level>,
}

impl Levels {
    pub fn of(&self, record: &str) -> Level {
        self.records.get(record).copied().unwrap_or(self.default)
    }
}

/// A contract and its published history.
#[derive(Debug)]
pub struct Contract {
    /// `namespace.Name`.
    pub name: String,
    /// The `.avsc` under `avro/`, if the contract still exists.
    pub current: Option<(PathBuf, String)>,
    /// Published versions, `(number, path, text)`, oldest first.
    pub published: Vec<(i32, PathBuf, String)>,
}

/// Everything under a `schemas/` directory.
#[derive(Debug)]
pub struct Repository {
    pub root: PathBuf,
    pub levels: Levels,
    pub contracts: Vec<Contract>,
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    Ok(paths)
}

impl Repository {
    /// Reads `root` (the `schemas/` directory).
    pub fn load(root: &Path) -> anyhow::Result<Self> {
        let levels_path = root.join("compatibility.json");
        let file: LevelsFile = serde_json::from_str(&read(&levels_path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", levels_path.display()))?;
        let parse = |what: &str, s: &str| {
            s.parse::<Level>()
                .map_err(|e| anyhow::anyhow!("{}: {what}: {e}", levels_path.display()))
        };
        let levels = Levels {
            default: parse("default", &file.default)?,
            records: file
                .records
                .iter()
                .map(|(k, v)| Ok((k.clone(), parse(k, v)?)))
                .collect::<anyhow::Result<_>>()?,
        };

        let mut contracts: BTreeMap<String, Contract> = BTreeMap::new();
        fn entry<'a>(
            contracts: &'a mut BTreeMap<String, Contract>,
            name: &str,
        ) -> &'a mut Contract {
            contracts
                .entry(name.to_owned())
                .or_insert_with(|| Contract {
                    name: name.to_owned(),
                    current: None,
                    published: Vec::new(),
                })
        }
        for ns in entries(&root.join("avro"))? {
            let Some(namespace) = ns.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            for file in entries(&ns)? {
                if file.extension().is_none_or(|e| e != "avsc") {
                    continue;
                }
                let Some(stem) = file.file_stem().and_then(|s| s.to_str()).map(str::to_owned)
                else {
                    continue;
                };
                let text = read(&file)?;
                entry(&mut contracts, &format!("{namespace}.{stem}")).current = Some((file, text));
            }
        }
        let published_dir = root.join("published");
        if published_dir.exists() {
            for dir in entries(&published_dir)? {
                let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                    continue;
                };
                let mut versions = Vec::new();
                for file in entries(&dir)? {
                    let version = file
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix('v')?.strip_suffix(".avsc")?.parse().ok())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "{}: published versions are named v1.avsc, v2.avsc, ...",
                                file.display()
                            )
                        })?;
                    let text = read(&file)?;
                    versions.push((version, file, text));
                }
                versions.sort_by_key(|(v, _, _)| *v);
                entry(&mut contracts, &name).published = versions;
            }
        }
        Ok(Self {
            root: root.to_owned(),
            levels,
            contracts: contracts.into_values().collect(),
        })
    }
}

/// What [`check`] found about one contract.
#[derive(Debug, PartialEq, Eq)]
pub enum Finding {
    /// The contract is its latest published version.
    Unchanged { version: i32 },
    /// The contract changed and may be published as `next`.
    Publishable { next: i32 },
    /// Something is wrong; each line says what and why.
    Broken(Vec<String>),
}

/// Checks one contract; see the module doc.
pub fn check_contract(contract: &Contract, level: Level) -> Finding {
    let mut problems = Vec::new();
    let mut history: Vec<(i32, apache_avro::Schema)> = Vec::new();
    let mut latest_normalized = None;
    for (i, (version, path, text)) in contract.published.iter().enumerate() {
        if *version != i as i32 + 1 {
            problems.push(format!(
                "{}: expected v{} (published versions are numbered without gaps)",
                path.display(),
                i + 1
            ));
        }
        match store::parse(text, None) {
            Err(e) => problems.push(format!("{}: {e}", path.display())),
            Ok(parsed) => {
                for why in compat::check(level, &parsed.schema, &history) {
                    problems.push(format!(
                        "{}: published history is inconsistent: {why}",
                        path.display()
                    ));
                }
                history.push((*version, parsed.schema));
                latest_normalized = Some(parsed.normalized);
            }
        }
    }
    let Some((path, text)) = &contract.current else {
        // A contract no longer written; its history stays for readers of old data.
        return if problems.is_empty() {
            Finding::Unchanged {
                version: history.len() as i32,
            }
        } else {
            Finding::Broken(problems)
        };
    };
    let current = match store::parse(text, None) {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!("{}: {e}", path.display()));
            return Finding::Broken(problems);
        }
    };
    if let apache_avro::Schema::Record(r) = &current.schema
        && r.name.fullname(None) != contract.name
    {
        problems.push(format!(
            "{}: the record is named {}, but its file says {}",
            path.display(),
            r.name.fullname(None),
            contract.name
        ));
    }
    if !problems.is_empty() {
        return Finding::Broken(problems);
    }
    if latest_normalized.as_deref() == Some(current.normalized.as_str()) {
        return Finding::Unchanged {
            version: history.len() as i32,
        };
    }
    let violations = compat::check(level, &current.schema, &history);
    if violations.is_empty() {
        Finding::Publishable {
            next: history.len() as i32 + 1,
        }
    } else {
        Finding::Broken(
            violations
                .into_iter()
                .map(|why| format!("{}: breaking change: {why}", path.display()))
                .collect(),
        )
    }
}

/// The whole repository: a report for people, and whether it passes.
pub fn check(repo: &Repository) -> (String, bool) {
    let mut report = String::new();
    let mut ok = true;
    for c in &repo.contracts {
        let level = repo.levels.of(&c.name);
        match check_contract(c, level) {
            Finding::Unchanged { version } => {
                let _ = writeln!(report, "ok      {} (v{version}, {level})", c.name);
            }
            Finding::Publishable { next } => {
                ok = false;
                let _ = writeln!(
                    report,
                    "CHANGED {}: compatible under {level}, but not published; run `keel schema publish` to record it as v{next}",
                    c.name
                );
            }
            Finding::Broken(problems) => {
                ok = false;
                let _ = writeln!(report, "BROKEN  {} ({level}):", c.name);
                for p in problems {
                    let _ = writeln!(report, "        {p}");
                }
            }
        }
    }
    (report, ok)
}

/// Records every changed, compatible contract as its next published version. Returns what was
/// written; refuses (writing nothing) if any contract is broken.
pub fn publish(repo: &Repository) -> anyhow::Result<Vec<PathBuf>> {
    let mut writes = Vec::new();
    for c in &repo.contracts {
        match check_contract(c, repo.levels.of(&c.name)) {
            Finding::Unchanged { .. } => {}
            Finding::Publishable { next } => {
                if let Some((_, text)) = &c.current {
                    let path = repo
                        .root
                        .join("published")
                        .join(&c.name)
                        .join(format!("v{next}.avsc"));
                    writes.push((path, text.clone()));
                }
            }
            Finding::Broken(problems) => {
                anyhow::bail!(
                    "{} cannot be published:\n  {}",
                    c.name,
                    problems.join("\n  ")
                )
            }
        }
    }
    for (path, text) in &writes {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(writes.into_iter().map(|(p, _)| p).collect())
}

/// What [`register`] did for one subject.
#[derive(Debug)]
pub struct Registration {
    pub subject: String,
    pub level: Level,
    /// `(version in the repository, id the registry gave)`, oldest first.
    pub ids: Vec<(i32, i64)>,
}

/// A Confluent-compatible registry's REST API, as [`register`] calls it.
struct Client {
    http: reqwest::Client,
    /// Safe to print: no credentials.
    base: String,
    auth: Option<(String, String)>,
}

impl Client {
    fn new(http: &reqwest::Client, registry_url: &str, setting: &str) -> anyhow::Result<Self> {
        // Credentials as basic auth on every request; the base URL printed in errors has none.
        let endpoint = crate::codec::Endpoint::parse_setting(registry_url, setting)?;
        Ok(Self {
            http: http.clone(),
            base: endpoint.base,
            auth: endpoint.auth,
        })
    }

    /// Sends `method path` with `body`; the answer's status and JSON body.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        what: &str,
    ) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
        const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE);
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| {
            anyhow::anyhow!(
                "{what}: registry at {} unreachable: {}",
                self.base,
                keel_core::error_chain(&e)
            )
        })?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or_default()))
    }

    /// As [`Client::send`], refusing any answer but a success.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        what: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.send(method, path, body, what).await?;
        if !status.is_success() {
            return Err(self.refused(what, status, &body));
        }
        Ok(body)
    }

    /// The error of a refused request, with the registry's error code and message.
    fn refused(
        &self,
        what: &str,
        status: reqwest::StatusCode,
        body: &serde_json::Value,
    ) -> anyhow::Error {
        anyhow::anyhow!(
            "{what}: the registry at {} refused ({status}, error_code {}): {}",
            self.base,
            body["error_code"],
            body["message"].as_str().unwrap_or("no message")
        )
    }

    /// The subject's own mode (`None`: it follows the registry's).
    async fn subject_mode(&self, subject: &str) -> anyhow::Result<Option<String>> {
        let what = format!("reading the mode of {subject}");
        let (status, body) = self
            .send(
                reqwest::Method::GET,
                &format!("/mode/{subject}"),
                None,
                &what,
            )
            .await?;
        match body["mode"].as_str() {
            Some(mode) if status.is_success() => Ok(Some(mode.to_owned())),
            // 40409: the subject has no mode of its own.
            _ if body["error_code"] == 40409 => Ok(None),
            _ => Err(self.refused(&what, status, &body)),
        }
    }
}

/// The setting (`keel schema register --ids-from`) naming the registry to copy ids from.
pub const IDS_FROM: &str = "KEEL_SCHEMA_IDS_FROM";

/// Registers every published version of the contracts of `namespace` under their subjects on
/// `topic` (oldest first, so the registry holds the same history as the repository), after
/// setting each subject's compatibility level. Works with any Confluent-compatible registry;
/// registering what is already there returns the existing ids, so running it again is harmless.
///
/// With `ids_from` (another registry's URL, which has these versions already), each version is
/// registered with the id and version number it has there: how contracts move between
/// registries keeping their ids. Each subject is put in `IMPORT` mode for it (forced, as its
/// versions may be there already; the registry still refuses an id or version that would
/// overwrite another) and given back its own mode, or none, after.
pub async fn register(
    repo: &Repository,
    registry_url: &str,
    topic: &str,
    namespace: &str,
    ids_from: Option<&str>,
) -> anyhow::Result<Vec<Registration>> {
    use reqwest::Method;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let target = Client::new(&http, registry_url, "KEEL_SCHEMA_REGISTRY_URL")?;
    let source = ids_from
        .map(|url| Client::new(&http, url, IDS_FROM))
        .transpose()?;
    let mut done = Vec::new();
    let prefix = format!("{namespace}.");
    for c in repo.contracts.iter().filter(|c| {
        c.name
            .strip_prefix(&prefix)
            .is_some_and(|rest| !rest.contains('.'))
    }) {
        let subject = crate::subject(topic, &c.name);
        let level = repo.levels.of(&c.name);
        let mut texts: Vec<(i32, &str)> = c
            .published
            .iter()
            .map(|(v, _, t)| (*v, t.as_str()))
            .collect();
        if let Some((_, current)) = &c.current
            && !matches!(check_contract(c, level), Finding::Unchanged { .. })
        {
            texts.push((texts.len() as i32 + 1, current.as_str()));
        }
        // What the source holds, before anything on the target changes.
        let found = match &source {
            Some(source) => Some(look_up(source, &subject, &c.name, &texts).await?),
            None => None,
        };
        target
            .call(
                Method::PUT,
                &format!("/config/{subject}"),
                Some(serde_json::json!({"compatibility": level.as_str()})),
                &format!("setting {subject} to {level}"),
            )
            .await?;
        let ids = match found {
            None => register_versions(&target, &subject, &c.name, &texts).await?,
            Some(found) => import_versions(&target, &subject, &c.name, found).await?,
        };
        done.push(Registration {
            subject,
            level,
            ids,
        });
    }
    Ok(done)
}

/// Registers `texts` (`(version in the repository, schema)`) under `subject`, letting the
/// registry give ids.
async fn register_versions(
    target: &Client,
    subject: &str,
    name: &str,
    texts: &[(i32, &str)],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let mut ids = Vec::new();
    for (version, text) in texts {
        let body = target
            .call(
                reqwest::Method::POST,
                &format!("/subjects/{subject}/versions"),
                Some(serde_json::json!({"schema": text})),
                &format!("registering {name} v{version} as {subject}"),
            )
            .await?;
        ids.push((*version, answered_id(&body, subject)?));
    }
    Ok(ids)
}

/// A version to import: `(version in the repository, schema, id, version number)` as the
/// source registry has them.
type Found<'a> = (i32, &'a str, i64, i64);

/// The id and version number `source` gives each of `texts` under `subject`.
async fn look_up<'a>(
    source: &Client,
    subject: &str,
    name: &str,
    texts: &[(i32, &'a str)],
) -> anyhow::Result<Vec<Found<'a>>> {
    let mut found = Vec::new();
    for (version, text) in texts {
        let body = source
            .call(
                reqwest::Method::POST,
                &format!("/subjects/{subject}"),
                Some(serde_json::json!({"schema": text})),
                &format!(
                    "looking up {name} v{version} as {subject} in the registry to copy ids from"
                ),
            )
            .await?;
        let given = body["version"].as_i64().ok_or_else(|| {
            anyhow::anyhow!("looking up {subject}: the registry answered without a version: {body}")
        })?;
        found.push((*version, *text, answered_id(&body, subject)?, given));
    }
    Ok(found)
}

/// Registers `found` under `subject` with the source's ids and version numbers, the subject in
/// `IMPORT` mode meanwhile and given back its own mode (or none) after, however the import went.
async fn import_versions(
    target: &Client,
    subject: &str,
    name: &str,
    found: Vec<Found<'_>>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    use reqwest::Method;
    let own_mode = target.subject_mode(subject).await?;
    let imported = async {
        target
            .call(
                Method::PUT,
                &format!("/mode/{subject}?force=true"),
                Some(serde_json::json!({"mode": "IMPORT"})),
                &format!("putting {subject} in IMPORT mode"),
            )
            .await?;
        let mut ids = Vec::new();
        for (version, text, id, given) in found {
            let body = target
                .call(
                    Method::POST,
                    &format!("/subjects/{subject}/versions"),
                    Some(serde_json::json!({"schema": text, "id": id, "version": given})),
                    &format!("importing {name} v{version} as {subject} (id {id}, version {given})"),
                )
                .await?;
            let answered = answered_id(&body, subject)?;
            // A registry that took the mode but not the id would defeat the point.
            if answered != id {
                anyhow::bail!(
                    "importing {name} v{version} as {subject}: the registry gave id {answered}, not {id}"
                );
            }
            ids.push((version, id));
        }
        Ok(ids)
    }
    .await;
    // Also after a failed PUT: it may have been applied before its answer was lost.
    let restored = match &own_mode {
        Some(mode) => {
            target
                .call(
                    Method::PUT,
                    &format!("/mode/{subject}?force=true"),
                    Some(serde_json::json!({ "mode": mode })),
                    &format!("giving {subject} back its mode {mode}"),
                )
                .await
        }
        // 40409: it has no mode of its own (the PUT did not go through).
        None => {
            let what = format!("giving {subject} back the registry's mode");
            target
                .send(Method::DELETE, &format!("/mode/{subject}"), None, &what)
                .await
                .and_then(|(status, body)| {
                    if status.is_success() || body["error_code"] == 40409 {
                        Ok(body)
                    } else {
                        Err(target.refused(&what, status, &body))
                    }
                })
        }
    };
    match (imported, restored) {
        (Ok(ids), Ok(_)) => Ok(ids),
        (imported, Err(restore)) => {
            let still = format!(
                "{subject} is still in IMPORT mode, where registrations without an id are refused: {restore:#}"
            );
            match imported {
                Ok(_) => Err(restore.context(still)),
                Err(e) => Err(e.context(still)),
            }
        }
        (Err(e), Ok(_)) => Err(e),
    }
}

fn answered_id(body: &serde_json::Value, subject: &str) -> anyhow::Result<i64> {
    body["id"].as_i64().ok_or_else(|| {
        anyhow::anyhow!("registering {subject}: the registry answered without an id: {body}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &str) -> String {
        format!(r#"{{"type":"record","name":"R","namespace":"t","fields":[{fields}]}}"#)
    }

    fn contract(published: &[&str], current: &str) -> Contract {
        Contract {
            name: "t.R".into(),
            current: Some((PathBuf::from("avro/t/R.avsc"), current.to_owned())),
            published: published
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    (
                        i as i32 + 1,
                        PathBuf::from(format!("published/t.R/v{}.avsc", i + 1)),
                        (*t).to_owned(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn an_unchanged_contract_passes_whatever_its_formatting() {
        let v1 = record(r#"{"name":"a","type":"string"}"#);
        let reformatted = v1.replace(',', " ,\n ");
        assert_eq!(
            check_contract(&contract(&[&v1], &reformatted), Level::FullTransitive),
            Finding::Unchanged { version: 1 }
        );
    }

    #[test]
    fn a_compatible_change_must_be_published_and_a_breaking_one_names_the_field() {
        let v1 = record(r#"{"name":"a","type":"string"}"#);
        let optional =
            record(r#"{"name":"a","type":"string"},{"name":"b","type":"int","default":0}"#);
        assert_eq!(
            check_contract(&contract(&[&v1], &optional), Level::FullTransitive),
            Finding::Publishable { next: 2 }
        );
        let required = record(r#"{"name":"a","type":"string"},{"name":"b","type":"int"}"#);
        let Finding::Broken(problems) =
            check_contract(&contract(&[&v1], &required), Level::FullTransitive)
        else {
            panic!("a field without a default breaks BACKWARD");
        };
        assert!(
            problems
                .iter()
                .any(|p| p.contains("'b'") && p.contains("version 1")),
            "{problems:?}"
        );
        // The same change is fine where nobody checks.
        assert_eq!(
            check_contract(&contract(&[&v1], &required), Level::None),
            Finding::Publishable { next: 2 }
        );
    }

    #[test]
    fn an_edited_history_is_caught() {
        let v1 = record(r#"{"name":"a","type":"string"}"#);
        let v2_breaking = record(r#"{"name":"a","type":"int"}"#);
        let Finding::Broken(problems) = check_contract(
            &contract(&[&v1, &v2_breaking], &v2_breaking),
            Level::Backward,
        ) else {
            panic!("string → int is not a promotion");
        };
        assert!(
            problems[0].contains("v2.avsc") && problems[0].contains("inconsistent"),
            "{problems:?}"
        );
    }
}

#[cfg(test)]
mod repository {
    use super::*;

    /// The contracts in this repository are published and their history is consistent: the
    /// same check as `make schema-check`, so `cargo test` alone catches an unpublished change.
    #[test]
    fn this_repositorys_contracts_pass_the_check() {
        let repo = Repository::load(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(repo.contracts.len() >= crate::events::CONTRACTS.len());
        let (report, ok) = check(&repo);
        assert!(ok, "{report}");
    }
}
