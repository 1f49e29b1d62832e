//! The deployment files against the binary they deploy: every command and
//! flag the Kubernetes manifests (`deploy/k8s/*.yaml`) give a container is
//! one `shuffle-server` accepts, the configuration they make validates, the
//! ports, probes, Services, volumes and secrets agree with the flags, and a
//! coordinator and a worker started from the manifests' own arguments form a
//! cluster whose readiness probes answer and whose worker decommissions and
//! exits 0.
//!
//! How the manifests are read: no YAML crate, but [`yaml`], a reader of the
//! subset they are written in (block mappings and sequences, one entry per
//! line; plain, single- and double-quoted scalars; `{}` and `[]` for empty
//! ones; comments; `---` between documents). Anything else (flow
//! collections, multi-line scalars, anchors, tags, tabs) is refused with the
//! file and line, so a manifest edited into a layout it cannot read fails
//! the test instead of being skipped. Container arguments must be written
//! `--flag=value`, one per list entry, so each value is known to be its
//! flag's.
//!
//! How a pod is imitated: Kubernetes expands `$(VAR)` in `args` from the
//! container's `env` (values and the downward API's `status.podIP` and
//! `metadata.name`) and from the variables it sets for every Service with a
//! cluster IP (`NAME_SERVICE_HOST`, `NAME_SERVICE_PORT`); anything else would
//! be left unexpanded, which the test refuses. Each pod gets a loopback
//! address of its own as its IP; a Service's IP is that of the one pod it
//! selects (its ports are checked to equal their target ports, so no
//! translation is lost). Each volume mount is a temporary directory, filled
//! with the keys of the Secret it mounts: the manifests' own Secrets, and
//! `shuffle-tls`, made as deploy/README.md says (`--write-cert`, then
//! `kubectl create secret tls`, whose keys are `tls.crt` and `tls.key`).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use shuffle_server::{Role, ServerConfig};
use yaml::Node;

const BIN: &str = env!("CARGO_BIN_EXE_shuffle-server");

/// The repository root, where `Dockerfile` and `deploy/` are.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// The Secret the README has the operator create from `--write-cert` output.
const TLS_SECRET: &str = "shuffle-tls";

/// The name the manifests invoke the binary by (on PATH in the image).
const COMMAND: &str = "shuffle-server";

/// A manifest reader for the subset of YAML the deploy files use.
mod yaml {
    /// A value: a scalar (kept as written, unquoted), a mapping in file
    /// order, or a sequence.
    #[derive(Clone, Debug, PartialEq)]
    pub enum Node {
        Scalar(String),
        Map(Vec<(String, Node)>),
        Seq(Vec<Node>),
    }

    impl Node {
        /// The value at a dotted path of mapping keys (`spec.template.spec`).
        pub fn at(&self, path: &str) -> Option<&Node> {
            path.split('.').try_fold(self, |node, key| match node {
                Node::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            })
        }

        /// The scalar at `path`, if there is one.
        pub fn str(&self, path: &str) -> Option<&str> {
            match self.at(path)? {
                Node::Scalar(s) => Some(s),
                _ => None,
            }
        }

        /// The items of the sequence at `path`; none if it is absent.
        pub fn items(&self, path: &str) -> &[Node] {
            match self.at(path) {
                Some(Node::Seq(items)) => items,
                _ => &[],
            }
        }

        /// The entries of the mapping at `path`; none if it is absent.
        pub fn entries(&self, path: &str) -> &[(String, Node)] {
            match self.at(path) {
                Some(Node::Map(entries)) => entries,
                _ => &[],
            }
        }
    }

    /// One line with content: its number (from 1), indentation and text
    /// without indentation or comment.
    struct Line {
        number: usize,
        indent: usize,
        text: String,
    }

    /// Reads every document of `text` (named `file` in errors).
    pub fn parse(file: &str, text: &str) -> Result<Vec<Node>, String> {
        let mut documents = vec![Vec::new()];
        for (i, raw) in text.lines().enumerate() {
            let number = i + 1;
            let err = |what: &str| Err(format!("{file}:{number}: {what}: {raw:?}"));
            let content = strip_comment(raw);
            if content.trim().is_empty() {
                continue;
            }
            if content.trim_end() == "---" {
                documents.push(Vec::new());
                continue;
            }
            let indent = content.len() - content.trim_start_matches(' ').len();
            if content[indent..].starts_with('\t') {
                return err("tabs in indentation");
            }
            if indent == 0 && (content.starts_with('%') || content.starts_with("...")) {
                return err("directives and document ends are not read");
            }
            documents.last_mut().expect("one at least").push(Line {
                number,
                indent,
                text: content[indent..].trim_end().to_string(),
            });
        }
        documents
            .into_iter()
            .filter(|lines| !lines.is_empty())
            .map(|mut lines| {
                let mut pos = 0;
                let indent = lines[0].indent;
                let node = block(file, &mut lines, &mut pos, indent)?;
                match lines.get(pos) {
                    Some(l) => Err(format!("{file}:{}: unexpected indentation: {:?}", l.number, l.text)),
                    None => Ok(node),
                }
            })
            .collect()
    }

    /// The line without its comment: `#` at its start or after a space, outside quotes.
    fn strip_comment(line: &str) -> &str {
        let (mut single, mut double, mut previous) = (false, false, ' ');
        for (i, c) in line.char_indices() {
            match c {
                '\'' if !double => single = !single,
                '"' if !single => double = !double,
                '#' if !single && !double && previous == ' ' => return &line[..i],
                _ => {}
            }
            previous = c;
        }
        line
    }

    fn is_item(text: &str) -> bool {
        text == "-" || text.starts_with("- ")
    }

    /// `key: value` or `key:` split into the key and the rest (trimmed).
    fn key_value(text: &str) -> Option<(&str, &str)> {
        let (key, rest) = match text.find(": ") {
            Some(i) => (&text[..i], &text[i + 2..]),
            None => (text.strip_suffix(':')?, ""),
        };
        let plain = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b));
        plain.then_some((key, rest.trim()))
    }

    fn scalar(file: &str, line: &Line, text: &str) -> Result<Node, String> {
        let err = |what: &str| Err(format!("{file}:{}: {what}: {text:?}", line.number));
        if let Some(inner) = text.strip_prefix('"') {
            let Some(inner) = inner.strip_suffix('"') else { return err("unterminated or multi-line string") };
            let mut out = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(e @ ('"' | '\\')) => out.push(e),
                        _ => return err("only \\\" and \\\\ escapes are read"),
                    },
                    '"' => return err("an unescaped quote inside a string"),
                    c => out.push(c),
                }
            }
            return Ok(Node::Scalar(out));
        }
        if let Some(inner) = text.strip_prefix('\'') {
            let Some(inner) = inner.strip_suffix('\'') else { return err("unterminated or multi-line string") };
            return Ok(Node::Scalar(inner.replace("''", "'")));
        }
        match text {
            "{}" => return Ok(Node::Map(Vec::new())),
            "[]" => return Ok(Node::Seq(Vec::new())),
            _ => {}
        }
        if text.starts_with(['|', '>', '&', '*', '!', '{', '[', '%', '@', '`']) {
            return err("block scalars, anchors, aliases, tags and flow collections are not read");
        }
        Ok(Node::Scalar(text.to_string()))
    }

    /// The mapping or sequence whose lines start at `pos` with `indent`.
    fn block(file: &str, lines: &mut [Line], pos: &mut usize, indent: usize) -> Result<Node, String> {
        if is_item(&lines[*pos].text) { sequence(file, lines, pos, indent) } else { mapping(file, lines, pos, indent) }
    }

    /// A scalar ends its line: the next line may not be indented deeper.
    fn no_continuation(file: &str, lines: &[Line], pos: usize, indent: usize) -> Result<(), String> {
        match lines.get(pos) {
            Some(next) if next.indent > indent => {
                Err(format!("{file}:{}: multi-line scalars are not read: {:?}", next.number, next.text))
            }
            _ => Ok(()),
        }
    }

    fn sequence(file: &str, lines: &mut [Line], pos: &mut usize, indent: usize) -> Result<Node, String> {
        let mut items = Vec::new();
        while *pos < lines.len() && lines[*pos].indent == indent && is_item(&lines[*pos].text) {
            let text = lines[*pos].text.clone();
            let rest = text[1..].trim_start();
            if rest.is_empty() {
                *pos += 1;
                match lines.get(*pos) {
                    Some(next) if next.indent > indent => {
                        let deeper = next.indent;
                        items.push(block(file, lines, pos, deeper)?);
                    }
                    _ => items.push(Node::Scalar(String::new())),
                }
            } else if key_value(rest).is_some() || is_item(rest) {
                // `- key: value` opens a mapping (or `- - x` a sequence) at the column of its first key.
                let column = indent + (text.len() - rest.len());
                lines[*pos].indent = column;
                lines[*pos].text = rest.to_string();
                items.push(block(file, lines, pos, column)?);
            } else {
                items.push(scalar(file, &lines[*pos], rest)?);
                *pos += 1;
                no_continuation(file, lines, *pos, indent)?;
            }
        }
        Ok(Node::Seq(items))
    }

    fn mapping(file: &str, lines: &mut [Line], pos: &mut usize, indent: usize) -> Result<Node, String> {
        let mut entries: Vec<(String, Node)> = Vec::new();
        while *pos < lines.len() && lines[*pos].indent == indent && !is_item(&lines[*pos].text) {
            let line = &lines[*pos];
            let Some((key, rest)) = key_value(&line.text) else {
                return Err(format!("{file}:{}: expected `key: value`: {:?}", line.number, line.text));
            };
            let (key, rest) = (key.to_string(), rest.to_string());
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(format!("{file}:{}: key {key:?} given twice", line.number));
            }
            let value = if rest.is_empty() {
                *pos += 1;
                match lines.get(*pos) {
                    Some(next) if next.indent > indent => {
                        let deeper = next.indent;
                        block(file, lines, pos, deeper)?
                    }
                    // Kubernetes' own style: a sequence under its key at the key's indentation.
                    Some(next) if next.indent == indent && is_item(&next.text) => sequence(file, lines, pos, indent)?,
                    _ => Node::Scalar(String::new()),
                }
            } else {
                let value = scalar(file, line, &rest)?;
                *pos += 1;
                no_continuation(file, lines, *pos, indent)?;
                value
            };
            entries.push((key, value));
        }
        if let Some(line) = lines.get(*pos).filter(|l| l.indent == indent) {
            return Err(format!("{file}:{}: a sequence item among mapping keys: {:?}", line.number, line.text));
        }
        Ok(Node::Map(entries))
    }
}

#[test]
fn the_manifest_reader_reads_its_subset_and_refuses_the_rest_with_the_line() {
    let text = "a: 1\nb:\n  c: \"x # y\"   # comment\n  d:\n  - p\n  - q: 'it''s'\n    r: {}\n---\n- - z\n";
    let docs = yaml::parse("t.yaml", text).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].str("a"), Some("1"));
    assert_eq!(docs[0].str("b.c"), Some("x # y"));
    let d = docs[0].items("b.d");
    assert_eq!(d[0], Node::Scalar("p".into()));
    assert_eq!(d[1].str("q"), Some("it's"));
    assert_eq!(d[1].at("r"), Some(&Node::Map(vec![])));
    assert_eq!(docs[1], Node::Seq(vec![Node::Seq(vec![Node::Scalar("z".into())])]));
    for (bad, why) in [
        ("a: [1, 2]\n", "flow"),
        ("a: |\n  text\n", "block scalars"),
        ("a: &x 1\n", "anchors"),
        ("a: b\n  c: d\n", "multi-line"),
        ("a:\n\t- b\n", "tabs"),
        ("a: 1\na: 2\n", "twice"),
        ("a:\n  b: 1\n c: 2\n", "indentation"),
    ] {
        let err = yaml::parse("bad.yaml", bad).unwrap_err();
        assert!(err.contains(why) && err.starts_with("bad.yaml:"), "{bad:?}: {err}");
    }
}

/// Every document of every `deploy/k8s/*.yaml`, with its file name.
fn manifests() -> Vec<(String, Node)> {
    let dir = repo_root().join("deploy/k8s");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in yaml::parse(&name, &text).unwrap_or_else(|e| panic!("{e}")) {
            let kind = doc.str("kind").unwrap_or_else(|| panic!("{name}: a document without a kind"));
            assert!(
                // Workloads are StatefulSets: a pod's name is then known (NAME-0), and
                // one replica is at most one pod (the coordinator's rule).
                ["Secret", "Service", "StatefulSet"].contains(&kind),
                "{name}: kind {kind} is not one this test knows how to check"
            );
            docs.push((name.clone(), doc));
        }
    }
    docs
}

/// A Service as the test needs it.
struct Service {
    name: String,
    /// `clusterIP: None`: Kubernetes sets no variables for it.
    headless: bool,
    selector: Vec<(String, String)>,
    /// (port name, protocol, port, target port as written).
    ports: Vec<(String, String, u16, String)>,
}

/// One pod of a workload (its first replica), with what the test derives for it.
struct Pod {
    /// `StatefulSet/shuffle-worker` and the like, for messages.
    workload: String,
    replicas: u64,
    /// The first pod's name, `NAME-0`.
    name: String,
    /// The loopback address standing in for the pod's IP.
    ip: Ipv4Addr,
    /// The pod template's labels, which Services select by.
    labels: Vec<(String, String)>,
    /// The pod template's spec.
    spec: Node,
    /// Names of the workload's volumeClaimTemplates.
    claims: Vec<String>,
    /// A StatefulSet's governing Service.
    service_name: Option<String>,
}

/// The manifests, split into what the checks need.
struct Deployment {
    /// Secret name to its `stringData`.
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    services: Vec<Service>,
    pods: Vec<Pod>,
}

fn string_pairs(node: &Node, path: &str) -> Vec<(String, String)> {
    node.entries(path)
        .iter()
        .map(|(k, v)| match v {
            Node::Scalar(s) => (k.clone(), s.clone()),
            other => panic!("{path}.{k} is not a scalar: {other:?}"),
        })
        .collect()
}

/// Loopback addresses standing in for pod IPs: a block of 127/8 chosen by
/// the process id, so concurrent runs on one host are unlikely to share one
/// (within this process only one test binds them).
fn pod_ip(index: usize) -> Ipv4Addr {
    let block = (std::process::id() % 200) as u8 + 20;
    Ipv4Addr::new(127, 77, block, 2 + index as u8)
}

fn load_deployment() -> Deployment {
    let mut deployment = Deployment { secrets: BTreeMap::new(), services: Vec::new(), pods: Vec::new() };
    for (file, doc) in manifests() {
        let name = doc.str("metadata.name").unwrap_or_else(|| panic!("{file}: a document without a name")).to_string();
        assert!(doc.at("metadata.namespace").is_none(), "{file}: {name} names a namespace; the manifests must not");
        match doc.str("kind").unwrap() {
            "Secret" => {
                assert!(doc.at("data").is_none(), "{file}: {name}: write the placeholder under stringData");
                deployment.secrets.insert(name, string_pairs(&doc, "stringData").into_iter().collect());
            }
            "Service" => {
                let ports = doc
                    .items("spec.ports")
                    .iter()
                    .map(|p| {
                        let field = |k: &str| p.str(k).unwrap_or_else(|| panic!("{file}: {name}: a port without {k}"));
                        let port = field("port").parse().unwrap_or_else(|e| panic!("{file}: {name}: port: {e}"));
                        (field("name").into(), field("protocol").into(), port, field("targetPort").into())
                    })
                    .collect();
                deployment.services.push(Service {
                    headless: doc.str("spec.clusterIP") == Some("None"),
                    selector: string_pairs(&doc, "spec.selector"),
                    ports,
                    name,
                });
            }
            "StatefulSet" => {
                let replicas = doc.str("spec.replicas").unwrap_or("1").parse().unwrap();
                let index = deployment.pods.len();
                deployment.pods.push(Pod {
                    workload: format!("StatefulSet/{name}"),
                    replicas,
                    name: format!("{name}-0"),
                    ip: pod_ip(index),
                    labels: string_pairs(&doc, "spec.template.metadata.labels"),
                    spec: doc.at("spec.template.spec").unwrap_or_else(|| panic!("{file}: {name}: no pod spec")).clone(),
                    claims: doc
                        .items("spec.volumeClaimTemplates")
                        .iter()
                        .map(|c| c.str("metadata.name").unwrap().to_string())
                        .collect(),
                    service_name: doc.str("spec.serviceName").map(str::to_string),
                });
            }
            _ => {}
        }
    }
    deployment
}

impl Deployment {
    /// The one pod a Service selects (a ClusterIP Service in front of one pod).
    fn selected(&self, service: &Service) -> &Pod {
        let selected: Vec<_> =
            self.pods.iter().filter(|p| service.selector.iter().all(|kv| p.labels.contains(kv))).collect();
        assert_eq!(selected.len(), 1, "Service {} selects {} workloads", service.name, selected.len());
        selected[0]
    }

    /// The variables Kubernetes sets for every Service with a cluster IP,
    /// with the selected pod's IP standing in for the Service's.
    fn service_variables(&self) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::new();
        for service in self.services.iter().filter(|s| !s.headless) {
            let prefix = service.name.to_uppercase().replace('-', "_");
            vars.insert(format!("{prefix}_SERVICE_HOST"), self.selected(service).ip.to_string());
            if let Some((_, _, port, _)) = service.ports.first() {
                vars.insert(format!("{prefix}_SERVICE_PORT"), port.to_string());
            }
            for (name, _, port, _) in &service.ports {
                vars.insert(
                    format!("{prefix}_SERVICE_PORT_{}", name.to_uppercase().replace('-', "_")),
                    port.to_string(),
                );
            }
        }
        vars
    }
}

/// A pod's containers (each must run shuffle-server: see [`argv`]).
fn containers(pod: &Pod) -> Vec<&Node> {
    assert!(pod.spec.items("initContainers").is_empty(), "{}: init containers are not checked", pod.workload);
    let all = pod.spec.items("containers");
    assert!(!all.is_empty(), "{}: no containers", pod.workload);
    all.iter().collect()
}

/// `$(VAR)` expanded as Kubernetes does, except that an unknown variable
/// (which Kubernetes would leave as written) is an error.
fn expand(arg: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("$(") {
            let end = after.find(')').ok_or_else(|| format!("{arg:?}: an unclosed $("))?;
            let name = &after[..end];
            let value = vars.get(name).ok_or_else(|| {
                format!("{arg:?}: $({name}) is neither in the container's env nor a Service's variable")
            })?;
            out.push_str(value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A container's `env`, as `$(VAR)` sees it, for a pod named `pod.name` at `pod.ip`.
fn container_variables(pod: &Pod, container: &Node, services: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut vars = services.clone();
    for entry in container.items("env") {
        let name = entry.str("name").expect("an env entry without a name").to_string();
        let value = match (entry.str("value"), entry.str("valueFrom.fieldRef.fieldPath")) {
            (Some(v), None) => v.to_string(),
            (None, Some("status.podIP")) => pod.ip.to_string(),
            (None, Some("metadata.name")) => pod.name.clone(),
            other => panic!("{}: env {name}: {other:?} is not a value or field the test imitates", pod.workload),
        };
        vars.insert(name, value);
    }
    vars
}

/// One volume mount of a container, backed by a directory on this host.
struct Mount {
    /// Where the container sees it.
    path: String,
    /// The directory standing in for it.
    dir: PathBuf,
    /// The volume's (or volumeClaimTemplate's) name.
    volume: String,
    read_only: bool,
}

/// A container's volume mounts.
struct Mounts {
    mounts: Vec<Mount>,
}

impl Mounts {
    /// Creates a directory per mounted volume, filled with the keys of the Secret it mounts.
    fn create(pod: &Pod, container: &Node, secrets: &BTreeMap<String, BTreeMap<String, String>>, root: &Path) -> Self {
        let mut mounts = Vec::new();
        for mount in container.items("volumeMounts") {
            let (volume, path) = (mount.str("name").unwrap(), mount.str("mountPath").unwrap());
            assert!(path.starts_with('/'), "{}: mount path {path} is not absolute", pod.workload);
            let dir = root.join(&pod.name).join(volume);
            std::fs::create_dir_all(&dir).unwrap();
            let declared = pod.spec.items("volumes").iter().find(|v| v.str("name") == Some(volume));
            match declared {
                Some(v) if v.at("secret").is_some() => {
                    let secret = v.str("secret.secretName").unwrap();
                    let keys = secrets.get(secret).unwrap_or_else(|| {
                        panic!("{}: volume {volume} mounts Secret {secret}, which nothing creates", pod.workload)
                    });
                    for (key, value) in keys {
                        std::fs::write(dir.join(key), value).unwrap();
                    }
                }
                Some(v) if v.at("emptyDir").is_some() => {}
                Some(v) => panic!("{}: volume {volume} is of a kind the test does not imitate: {v:?}", pod.workload),
                None => assert!(
                    pod.claims.iter().any(|c| c == volume),
                    "{}: mount {volume} is neither a volume nor a volumeClaimTemplate",
                    pod.workload
                ),
            }
            let read_only = mount.str("readOnly") == Some("true");
            mounts.push(Mount { path: path.to_string(), dir, volume: volume.to_string(), read_only });
        }
        Self { mounts }
    }

    /// The mount holding `path` in the container.
    fn holding(&self, path: &str) -> Option<&Mount> {
        self.mounts.iter().find(|m| path == m.path || path.starts_with(&format!("{}/", m.path)))
    }

    /// The mount whose backing directory holds `host`, a path on this host.
    fn backing(&self, host: &Path) -> Option<&Mount> {
        self.mounts.iter().find(|m| host.starts_with(&m.dir))
    }

    /// `path` in the container, as a path on this host.
    fn host_path(&self, path: &str) -> Option<PathBuf> {
        let mount = self.holding(path)?;
        Some(mount.dir.join(path[mount.path.len()..].trim_start_matches('/')))
    }
}

/// The argv a container runs: `command` then `args`, expanded; every
/// absolute path in a flag's value moved to the directory backing its
/// mount; and, if `pod_network` is set, the unspecified address replaced
/// by the pod's IP (the only address a pod has besides its own loopback).
fn argv(
    pod: &Pod,
    container: &Node,
    vars: &BTreeMap<String, String>,
    mounts: &Mounts,
    pod_network: bool,
) -> Vec<String> {
    let scalars = |key: &str| -> Vec<String> {
        container
            .items(key)
            .iter()
            .map(|n| match n {
                Node::Scalar(s) => s.clone(),
                other => panic!("{}: {key} holds a non-scalar: {other:?}", pod.workload),
            })
            .collect()
    };
    let command = scalars("command");
    assert_eq!(command, [COMMAND], "{}: the container must run {COMMAND} by name", pod.workload);
    let mut argv = command;
    for arg in scalars("args") {
        let arg = expand(&arg, vars).unwrap_or_else(|e| panic!("{}: {e}", pod.workload));
        let arg = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                let value = if value.starts_with('/') {
                    let host = mounts.host_path(value).unwrap_or_else(|| {
                        panic!("{}: {flag}={value} is on no volume (the image's root is read-only)", pod.workload)
                    });
                    host.to_str().unwrap().to_string()
                } else if pod_network {
                    value.replace("0.0.0.0", &pod.ip.to_string())
                } else {
                    value.to_string()
                };
                format!("{flag}={value}")
            }
            _ => {
                assert!(
                    !arg.starts_with('-'),
                    "{}: write {arg:?} as --flag=value, so the test knows the value is the flag's",
                    pod.workload
                );
                arg
            }
        };
        argv.push(arg);
    }
    argv
}

/// The Secret deploy/README.md has the operator create from `--write-cert`,
/// made the same way: the binary writes the pair, kubectl names the keys.
fn tls_secret(tls_name: &str, root: &Path) -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md")).unwrap();
    let command = format!("shuffle-server --tls-name {tls_name} --write-cert");
    assert!(readme.contains(&command), "deploy/README.md does not show `{command} DIR`");
    assert!(readme.contains(&format!("kubectl create secret tls {TLS_SECRET}")), "the README must name {TLS_SECRET}");
    let dir = root.join("write-cert");
    let out = Command::new(BIN).args(["--tls-name", tls_name, "--write-cert"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "--write-cert: {}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    BTreeMap::from([("tls.crt".to_string(), read("cert.pem")), ("tls.key".to_string(), read("key.pem"))])
}

/// The `--tls-name` every container gives (they must agree: one certificate).
fn tls_name(deployment: &Deployment) -> String {
    let mut names: Vec<String> = deployment
        .pods
        .iter()
        .flat_map(containers)
        .flat_map(|c| c.items("args"))
        .filter_map(|a| match a {
            Node::Scalar(s) => s.strip_prefix("--tls-name=").map(str::to_string),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 1, "the containers must share one --tls-name, not {names:?}");
    names.remove(0)
}

/// A container's port by number or name, as (number, protocol).
fn container_port(pod: &Pod, container: &Node, port: &str) -> (u16, String) {
    container
        .items("ports")
        .iter()
        .find(|p| p.str("name") == Some(port) || p.str("containerPort") == Some(port))
        .map(|p| (p.str("containerPort").unwrap().parse().unwrap(), p.str("protocol").unwrap_or("TCP").to_string()))
        .unwrap_or_else(|| panic!("{}: no container port {port}", pod.workload))
}

/// The role a pod is for, by its `app.kubernetes.io/component` label.
fn component(pod: &Pod) -> Role {
    match pod.labels.iter().find(|(k, _)| k == "app.kubernetes.io/component").map(|(_, v)| v.as_str()) {
        Some("coordinator") => Role::Coordinator,
        Some("worker") => Role::Worker,
        other => panic!("{}: component label {other:?} is neither coordinator nor worker", pod.workload),
    }
}

/// Each container's configuration, loaded and validated the way the binary does.
struct Loaded<'a> {
    pod: &'a Pod,
    container: &'a Node,
    config: ServerConfig,
    mounts: Mounts,
    /// The argv with paths and the pod network imitated, to run as a process.
    run_argv: Vec<String>,
}

fn load_all<'a>(deployment: &'a Deployment, root: &Path) -> Vec<Loaded<'a>> {
    let mut secrets = deployment.secrets.clone();
    secrets.insert(TLS_SECRET.to_string(), tls_secret(&tls_name(deployment), root));
    let services = deployment.service_variables();
    let mut loaded = Vec::new();
    for pod in &deployment.pods {
        for container in containers(pod) {
            let vars = container_variables(pod, container, &services);
            let mounts = Mounts::create(pod, container, &secrets, root);
            let args = argv(pod, container, &vars, &mounts, false);
            let config = ServerConfig::load(&args).unwrap_or_else(|e| panic!("{}: {args:?}: {e}", pod.workload));
            config.validate().unwrap_or_else(|e| panic!("{}: {args:?}: {e}", pod.workload));
            let run_argv = argv(pod, container, &vars, &mounts, true);
            loaded.push(Loaded { pod, container, config, mounts, run_argv });
        }
    }
    loaded
}

#[test]
fn every_manifest_command_and_flag_is_one_the_binary_accepts_and_validates() {
    let deployment = load_deployment();
    let root = tempfile::tempdir().unwrap();
    let loaded = load_all(&deployment, root.path());
    let roles: Vec<Role> = loaded.iter().map(|l| l.config.role).collect();
    assert!(roles.contains(&Role::Coordinator) && roles.contains(&Role::Worker), "{roles:?}");
    for l in &loaded {
        let (pod, config) = (l.pod, &l.config);
        assert_eq!(config.role, component(pod), "{}: the role argument and the component label differ", pod.workload);
        // The secrets the flags name are the mounted ones, and they load.
        let secret = config.cluster_secret.as_deref().expect("a cluster secret");
        assert_eq!(Some(secret), deployment.secrets["shuffle-cluster-secret"].get("cluster-secret").map(|s| s.trim()));
        for path in [config.cert.as_ref(), config.key.as_ref()].into_iter().flatten() {
            assert!(std::fs::read_to_string(path).unwrap().contains("-----BEGIN"), "{}", path.display());
        }
        // The same argv, given to the binary itself: it parses every flag and
        // reads the mounted files before `--write-cert` makes it exit.
        let out_dir = root.path().join(format!("{}-parse", pod.name));
        let out = Command::new(BIN).args(&l.run_argv[1..]).arg("--write-cert").arg(&out_dir).output().unwrap();
        assert!(out.status.success(), "{}: {:?}: {}", pod.workload, l.run_argv, String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_manifests_ports_probes_volumes_and_services_agree_with_the_flags() {
    let deployment = load_deployment();
    let root = tempfile::tempdir().unwrap();
    let loaded = load_all(&deployment, root.path());
    for l in &loaded {
        let (pod, c, config) = (l.pod, l.container, &l.config);
        let w = &pod.workload;
        // The listeners are reachable at the pod's IP, on the ports the container declares.
        assert!(config.listen.ip().is_unspecified(), "{w}: --listen {} is not reachable from outside", config.listen);
        let admin = config.metrics_addr.0.unwrap_or_else(|| panic!("{w}: the admin listener is off"));
        assert!(admin.ip().is_unspecified(), "{w}: --metrics-addr {admin}: the kubelet probes the pod IP");
        let declared: Vec<(u16, String)> =
            c.items("ports").iter().map(|p| container_port(pod, c, p.str("containerPort").unwrap())).collect();
        assert_eq!(
            declared,
            [(config.listen.port(), "UDP".to_string()), (admin.port(), "TCP".to_string())],
            "{w}: container ports must be --listen (QUIC, UDP) and --metrics-addr (TCP)"
        );
        // Readiness on the admin listener, on a route it serves.
        let probe = c.at("readinessProbe.httpGet").unwrap_or_else(|| panic!("{w}: no HTTP readiness probe"));
        let port = container_port(pod, c, probe.str("port").unwrap());
        assert_eq!(port, (admin.port(), "TCP".to_string()), "{w}: readiness must probe the admin listener");
        assert!(["/status", "/metrics"].contains(&probe.str("path").unwrap()), "{w}: probe path is no GET route");
        // SIGTERM drains within --shutdown-grace; leave 10 s to write shuffles down before SIGKILL.
        let grace: u64 = pod.spec.str("terminationGracePeriodSeconds").unwrap_or("30").parse().unwrap();
        assert!(
            Duration::from_secs(grace) >= config.shutdown_grace + Duration::from_secs(10),
            "{w}: terminationGracePeriodSeconds {grace} leaves no time after --shutdown-grace {:?}",
            config.shutdown_grace
        );
        // The data dir is a writable volume: a claim of its own for a worker.
        let data = l.mounts.backing(&config.data_dir);
        let data = data.unwrap_or_else(|| panic!("{w}: --data-dir {} is on no volume", config.data_dir.display()));
        let (mount, volume) = (&data.path, &data.volume);
        assert!(!data.read_only, "{w}: the data dir's volume {volume} is mounted read-only");
        assert_eq!(pod.spec.str("securityContext.runAsNonRoot"), Some("true"), "{w}");
        match config.role {
            Role::Coordinator => {
                assert_eq!(pod.replicas, 1, "{w}: exactly one coordinator decides commits");
                assert!(config.coordinator.is_empty());
            }
            Role::Worker => {
                assert!(pod.claims.contains(volume), "{w}: the data dir {mount} must be a volumeClaimTemplate");
                assert_eq!(config.advertise, Some(SocketAddr::new(IpAddr::V4(pod.ip), config.listen.port())), "{w}");
                assert_eq!(config.worker_id.as_deref(), Some(pod.name.as_str()), "{w}: the pod's name is its id");
                // Every coordinator address is a coordinator pod's QUIC listener (through its Service).
                for addr in &config.coordinator {
                    let found = loaded.iter().any(|o| {
                        o.config.role == Role::Coordinator
                            && *addr == SocketAddr::new(IpAddr::V4(o.pod.ip), o.config.listen.port())
                    });
                    assert!(found, "{w}: --coordinator {addr} is no coordinator's QUIC port");
                }
            }
            Role::Standalone => panic!("{w}: a standalone server in a cluster's manifests"),
        }
    }
    // Services: every port forwards to the same-numbered container port of the
    // same protocol (the test's Service addresses rely on it).
    for service in &deployment.services {
        let pod = deployment.selected(service);
        let l = loaded.iter().find(|l| std::ptr::eq(l.pod, pod)).unwrap();
        for (name, protocol, port, target) in &service.ports {
            let (number, target_protocol) = container_port(pod, l.container, target);
            assert_eq!((*port, protocol), (number, &target_protocol), "Service {}: port {name}", service.name);
        }
    }
    for pod in &deployment.pods {
        let name = pod.service_name.as_deref().unwrap_or_else(|| panic!("{}: no serviceName", pod.workload));
        let service = deployment.services.iter().find(|s| s.name == name);
        assert!(
            service.is_some_and(|s| s.selector.iter().all(|kv| pod.labels.contains(kv))),
            "{}: serviceName {name} must be a Service in the manifests that selects it",
            pod.workload
        );
    }
}

#[test]
fn the_dockerfile_installs_the_command_and_exposes_the_manifests_ports() {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let rust_version = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the workspace's rust-version");
    let builder = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a rust builder stage")
        .split(['-', ' '])
        .next()
        .unwrap();
    let version = |v: &str| v.split('.').map(|n| n.parse::<u32>().unwrap()).take(2).collect::<Vec<_>>();
    assert!(
        version(builder) >= version(rust_version),
        "builder rust:{builder} is older than rust-version {rust_version}"
    );
    assert!(dockerfile.contains("cargo build --release -p shuffle-server --locked"));
    assert!(dockerfile.contains(&format!("/usr/local/bin/{COMMAND}")), "the command must be on PATH");
    let deployment = load_deployment();
    let tmp = tempfile::tempdir().unwrap();
    for l in load_all(&deployment, tmp.path()) {
        let admin = l.config.metrics_addr.0.unwrap().port();
        let expose = format!("EXPOSE {}/udp {admin}/tcp", l.config.listen.port());
        assert!(dockerfile.contains(&expose), "{}: the Dockerfile must `{expose}`", l.pod.workload);
        let user = l.pod.spec.str("securityContext.runAsUser").unwrap();
        assert!(
            dockerfile.contains(&format!("USER {user}:")),
            "{}: runAsUser {user} is not the image's",
            l.pod.workload
        );
    }
}

/// A started container; killed if the test ends without stopping it.
struct Running {
    child: Child,
    log: mpsc::Receiver<String>,
    what: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(l: &Loaded) -> Self {
        let mut child = Command::new(BIN)
            .args(&l.run_argv[1..])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shuffle-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, log, what: l.pod.workload.clone() }
    }

    fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line =
                self.log.recv_timeout(left).unwrap_or_else(|_| panic!("{}: no log line with {needle:?}", self.what));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits up to `limit` for the process to exit and returns its code.
    fn exit_code_within(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().expect("an exit code, not a signal");
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One HTTP/1.1 request to `addr`; returns the status code and the body.
fn http(method: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Where the kubelet would send a container's readiness probe, in the pod network.
fn readiness(l: &Loaded) -> (SocketAddr, String) {
    let probe = l.container.at("readinessProbe.httpGet").unwrap();
    let (port, _) = container_port(l.pod, l.container, probe.str("port").unwrap());
    (SocketAddr::new(IpAddr::V4(l.pod.ip), port), probe.str("path").unwrap().to_string())
}

#[test]
fn a_coordinator_and_a_worker_started_from_the_manifests_form_a_cluster_and_decommission_cleanly() {
    let deployment = load_deployment();
    let root = tempfile::tempdir().unwrap();
    let loaded = load_all(&deployment, root.path());
    let coordinator = loaded.iter().find(|l| l.config.role == Role::Coordinator).unwrap();
    let worker = loaded.iter().find(|l| l.config.role == Role::Worker).unwrap();

    let mut c = Running::start(coordinator);
    c.wait_for_line("listening on");
    let mut w = Running::start(worker);
    w.wait_for_line("registered with the coordinator");

    // Both readiness probes pass; the coordinator lists the worker by its pod name, live.
    let (c_probe, c_path) = readiness(coordinator);
    let (w_probe, w_path) = readiness(worker);
    assert_eq!(http("GET", w_probe, &w_path).unwrap().0, 200, "the worker's readiness probe");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http("GET", c_probe, &c_path).unwrap();
        assert_eq!(code, 200, "the coordinator's readiness probe: {body}");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let listed = status["workers"].as_array().into_iter().flatten().any(|x| {
            x["id"] == worker.pod.name.as_str()
                && x["state"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("live"))
                && x["addr"] == worker.config.advertise.unwrap().to_string()
        });
        if listed {
            break;
        }
        assert!(Instant::now() < deadline, "the coordinator never listed {} as live: {body}", worker.pod.name);
        std::thread::sleep(Duration::from_millis(100));
    }

    // Decommission as deploy/README.md does it: the worker holds nothing, so it exits 0 at once.
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md")).unwrap();
    assert!(
        readme.contains("-X POST") && readme.contains("/decommission"),
        "the README must show the decommission call"
    );
    let (code, _) = http("POST", SocketAddr::new(IpAddr::V4(worker.pod.ip), w_probe.port()), "/decommission").unwrap();
    assert_eq!(code, 202);
    let grace =
        |l: &Loaded| Duration::from_secs(l.pod.spec.str("terminationGracePeriodSeconds").unwrap().parse().unwrap());
    assert_eq!(w.exit_code_within(Duration::from_secs(20)), 0, "a decommissioned worker exits 0");

    // SIGTERM, as Kubernetes stops a pod: a clean exit within its grace period.
    // SAFETY: kill(2) on our own child with a valid signal.
    assert_eq!(unsafe { libc::kill(c.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    assert_eq!(c.exit_code_within(grace(coordinator)), 0, "the coordinator on SIGTERM");
}
