// Hugging Face model ids (org/name[@revision]) and hf:// files, resolved to the local Hub cache exactly as
// huggingface_hub lays it out (<cache>/models--org--name/{refs,snapshots,blobs}): a model Python tools downloaded
// is used where it lies, and one downloaded here is theirs too. Missing files are fetched with the official client
// (@huggingface/hub) unless HF_HUB_OFFLINE is set. A path that exists locally always wins over an id.
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  datasetInfo,
  downloadFileToCacheDir,
  getRepoFolderName,
  HubApiError,
  modelInfo,
  pathsInfo,
  REGEX_COMMIT_HASH,
} from "@huggingface/hub";
import { writeFileAtomic } from "./model.js";

/** A Hub lookup that cannot be done, as one line naming the repo, the revision and what is missing. */
export class HubError extends Error {
  override name = "HubError";
}

/** How ids are resolved: revision, environment and progress. */
export interface HubOptions {
  /** Branch, tag or commit for an id without its own `@revision` (default "main"). */
  revision?: string;
  /**
   * The variables huggingface_hub reads: HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HF_ENDPOINT, HF_TOKEN (or the
   * token file, HF_TOKEN_PATH), HF_HUB_OFFLINE. Default: process.env.
   */
  env?: Record<string, string | undefined>;
  /** One-line notes: which commit an id resolved to, what is downloaded. */
  onInfo?: (line: string) => void;
  /** Download progress, in bytes over all the files one resolution downloads. */
  onDownload?: (p: DownloadProgress) => void;
}

/** Bytes downloaded so far (`done` of `total`) by one resolution, and the file in flight. */
export interface DownloadProgress {
  repo: string;
  file: string;
  done: number;
  total: number;
}

/** Where a path in the Hub cache comes from: its repo and commit (and, for a file, its path in the repo). */
export interface HubSource {
  type: "model" | "dataset";
  repo: string;
  commit: string;
  file?: string;
}

/** A repo and the revision asked for; `file` for a single file in it. */
interface HubRef {
  type: "model" | "dataset";
  repo: string;
  revision: string;
  file?: string;
}

/** The settings one resolution works with, read once from the environment. */
interface Hub {
  cache: string;
  endpoint: string;
  token: string | undefined;
  offline: boolean;
  opts: HubOptions;
}

type Env = Record<string, string | undefined>;

const expandHome = (p: string): string => (p === "~" || p.startsWith("~/") ? os.homedir() + p.slice(1) : p);

/** huggingface_hub's HF_HOME: $HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface. */
const hfHome = (env: Env): string =>
  expandHome(env.HF_HOME ?? path.join(env.XDG_CACHE_HOME ?? "~/.cache", "huggingface"));

/**
 * The Hub cache folder: HF_HUB_CACHE, else the older HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub (HF_HOME as
 * huggingface_hub defaults it, XDG_CACHE_HOME included). The client's getHFHubCachePath() follows the same order
 * but reads process.env only and leaves a leading "~" as it is, which Python expands.
 */
export function hubCacheDir(env: Env = process.env): string {
  return expandHome(env.HF_HUB_CACHE ?? env.HUGGINGFACE_HUB_CACHE ?? path.join(hfHome(env), "hub"));
}

/**
 * The access token huggingface_hub would send: HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN), else the file
 * `hf auth login` writes ($HF_TOKEN_PATH, default $HF_HOME/token); undefined when there is none.
 */
export function hubToken(env: Env = process.env): string | undefined {
  const clean = (t: string | undefined) => t?.replace(/[\r\n]/g, "").trim() || undefined;
  const fromEnv = clean(env.HF_TOKEN ?? env.HUGGING_FACE_HUB_TOKEN);
  if (fromEnv) return fromEnv;
  try {
    return clean(fs.readFileSync(expandHome(env.HF_TOKEN_PATH ?? path.join(hfHome(env), "token")), "utf8"));
  } catch {
    return undefined; // no token file: anonymous
  }
}

const isTrue = (v: string | undefined) => ["1", "ON", "YES", "TRUE"].includes((v ?? "").toUpperCase());

function hubOf(opts: HubOptions): Hub {
  const env = opts.env ?? process.env;
  return {
    cache: hubCacheDir(env),
    endpoint: (env.HF_ENDPOINT || "https://huggingface.co").replace(/\/+$/, ""),
    token: hubToken(env),
    offline: isTrue(env.HF_HUB_OFFLINE) || isTrue(env.TRANSFORMERS_OFFLINE),
    opts,
  };
}

/** One part of a repo id, as the Hub allows it: word characters, "." and "-", no "--" or "..", not ending in either. */
const validPart = (s: string) => /^\w[\w.-]*$/.test(s) && !/--|\.\./.test(s) && !/[.-]$/.test(s);

/** A Hugging Face model id `org/name` or `org/name@revision` split into repo and revision, or null if it is not one. */
export function parseHubId(spec: string): { repo: string; revision?: string } | null {
  const at = spec.indexOf("@");
  const repo = at < 0 ? spec : spec.slice(0, at);
  const revision = at < 0 ? undefined : spec.slice(at + 1);
  const parts = repo.split("/");
  if (parts.length !== 2 || !parts.every(validPart) || repo.length > 96 || revision === "") return null;
  return revision === undefined ? { repo } : { repo, revision };
}

/**
 * An hf:// file address as huggingface_hub's HfFileSystem writes it: hf://datasets/org/name[@revision]/path for
 * a dataset, hf://org/name[@revision]/path for a model (a revision holding "/" is URL-encoded); null otherwise.
 */
export function parseHfUrl(
  url: string,
): { type: "model" | "dataset"; repo: string; revision?: string; file: string } | null {
  if (!url.startsWith("hf://")) return null;
  const dataset = url.startsWith("hf://datasets/");
  const m = /^([^/@]+)\/([^/@]+)(?:@([^/]+))?\/(.+)$/.exec(url.slice(dataset ? 14 : 5));
  if (!m || !validPart(m[1]!) || !validPart(m[2]!) || m[1] === "spaces") return null;
  if (m[4]!.split("/").some((s) => s === "" || s === "." || s === "..")) return null;
  const revision = m[3] === undefined ? {} : { revision: decodeURIComponent(m[3]) };
  return { type: dataset ? "dataset" : "model", repo: `${m[1]}/${m[2]}`, ...revision, file: m[4]! };
}

/**
 * The local folder of a model: `spec` itself when that path exists (or is not a Hub id), else the snapshot of
 * the Hub model `org/name[@revision]` in the cache, its missing files downloaded first (config, tokenizer,
 * generation config and the safetensors weights; nothing else). A revision already cached is used with no
 * network call.
 */
export async function resolveModel(spec: string, opts: HubOptions = {}): Promise<string> {
  if (fs.existsSync(spec)) return spec;
  const id = parseHubId(spec);
  if (!id) return refuseEmptyPart(spec);
  const ref: HubRef = {
    type: "model",
    repo: id.repo,
    revision: checkedRevision(id.revision ?? opts.revision ?? "main"),
  };
  return snapshotFor(ref, hubOf(opts), missingModelFile, modelFiles);
}

/**
 * The local path of a file: `spec` itself unless it is an hf:// address, whose file comes from the cache
 * (downloaded first when missing), e.g. hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz.
 */
export async function resolveHubFile(spec: string, opts: HubOptions = {}): Promise<string> {
  if (!spec.startsWith("hf://")) return spec;
  const u = parseHfUrl(spec);
  if (!u)
    throw new HubError(
      `${spec}: not an hf:// file address (hf://datasets/org/name[@revision]/path, or hf://org/name[@revision]/path for a model repo)`,
    );
  const ref: HubRef = { type: u.type, repo: u.repo, revision: checkedRevision(u.revision ?? "main"), file: u.file };
  const missing = (dir: string) => (fs.existsSync(path.join(dir, u.file)) ? null : u.file);
  const dir = await snapshotFor(ref, hubOf(opts), missing, fileOnly);
  return path.join(dir, u.file);
}

/**
 * `spec`, which is neither a folder nor a Hub id, for the loader to say it is missing; unless it is an id with
 * nothing on one side of its "@" ("org/name@", "@main"), which is said here.
 */
function refuseEmptyPart(spec: string): string {
  const at = spec.indexOf("@");
  if (at === 0) throw new HubError(`${spec}: not a folder, nor a Hub id (no org/name before "@")`);
  if (at === spec.length - 1 && parseHubId(spec.slice(0, at)))
    throw new HubError(`${spec}: not a folder, nor a Hub id (no revision after "@")`);
  return spec;
}

/** A revision that is safe to join onto refs/: git refs cannot hold empty, "." or ".." parts either. */
function checkedRevision(revision: string): string {
  if (revision.split("/").some((s) => s === "" || s === "." || s === "..") || revision.includes("\\"))
    throw new HubError(`revision "${revision}" is not a branch, tag or commit name`);
  return revision;
}

/**
 * The repo and commit of a path inside a Hub cache (…/models--org--name/snapshots/<commit>[/file]), whatever the
 * cache's root; null for any other path.
 */
export function hubSourceOf(p: string): HubSource | null {
  const parts = path.resolve(p).split(path.sep);
  for (let i = 1; i + 1 < parts.length; i++) {
    const folder = /^(models|datasets)--(.+)$/.exec(parts[i - 1]!);
    if (!folder || parts[i] !== "snapshots" || !REGEX_COMMIT_HASH.test(parts[i + 1]!)) continue;
    const file = parts.slice(i + 2).join("/");
    const type = folder[1] === "models" ? "model" : "dataset";
    return { type, repo: folder[2]!.split("--").join("/"), commit: parts[i + 1]!, ...(file && { file }) };
  }
  return null;
}

/** The Hub sources of named inputs (those that lie in a Hub cache), or undefined when none does. */
export function hubSources(inputs: Record<string, string | undefined>): Record<string, HubSource> | undefined {
  const found = Object.entries(inputs).flatMap(([k, p]) => {
    const s = p === undefined ? null : hubSourceOf(p);
    return s ? [[k, s] as const] : [];
  });
  return found.length ? Object.fromEntries(found) : undefined;
}

const label = (ref: HubRef) => `${ref.type === "dataset" ? "datasets/" : ""}${ref.repo}@${ref.revision}`;
const repoFolder = (hub: Hub, ref: HubRef) =>
  path.join(hub.cache, getRepoFolderName({ type: ref.type, name: ref.repo }));
const snapshotDir = (hub: Hub, ref: HubRef, commit: string) => path.join(repoFolder(hub, ref), "snapshots", commit);

/**
 * The commit a revision names in the cache: a commit hash is itself; a branch or tag is what refs/<revision>
 * holds. null when there is no such ref; `notCommit` the ref's text when it holds something else.
 */
function cachedCommit(folder: string, revision: string): string | { notCommit: string } | null {
  if (REGEX_COMMIT_HASH.test(revision)) return revision;
  let text: string;
  try {
    text = fs.readFileSync(path.join(folder, "refs", revision), "utf8").trim();
  } catch {
    return null; // never resolved into this cache
  }
  return REGEX_COMMIT_HASH.test(text) ? text : { notCommit: text };
}

/** What a ref file that holds no commit holds, quoted and cut to a line's worth. */
const quoted = (text: string) => JSON.stringify(text.length > 60 ? `${text.slice(0, 60)}…` : text);

/** A file of a repo at a commit: its size and the name its blob has in the cache. */
interface RemoteFile {
  size: number;
  etag: string;
}

/**
 * The snapshot folder of `ref`: from the cache when it holds the revision with nothing `missing`; else (online)
 * the revision is resolved to a commit on the Hub, recorded in refs/, and the files `plan` names are downloaded.
 */
async function snapshotFor(
  ref: HubRef,
  hub: Hub,
  missing: (dir: string) => string | null,
  plan: (ref: HubRef, commit: string, hub: Hub) => Promise<Map<string, RemoteFile>>,
): Promise<string> {
  const folder = repoFolder(hub, ref);
  const held = cachedCommit(folder, ref.revision);
  const cached = typeof held === "string" ? held : null;
  const lacks = cached ? missing(snapshotDir(hub, ref, cached)) : null;
  if (cached && !lacks) {
    hub.opts.onInfo?.(`${label(ref)}: commit ${cached}, from the cache (${folder})`);
    return snapshotDir(hub, ref, cached);
  }
  if (hub.offline) {
    const what = cached
      ? `snapshot ${cached} lacks ${lacks}`
      : held !== null && typeof held === "object"
        ? `refs/${ref.revision} holds ${quoted(held.notCommit)}, not a commit hash`
        : `no refs/${ref.revision}`;
    throw new HubError(`HF_HUB_OFFLINE is set and ${label(ref)} is not in the cache ${hub.cache} (${what})`);
  }
  const commit = await remoteCommit(ref, hub);
  // recorded before the downloads, as huggingface_hub does: a later run finds the commit, and what it still lacks
  if (commit !== ref.revision) {
    fs.mkdirSync(path.dirname(path.join(folder, "refs", ref.revision)), { recursive: true });
    writeFileAtomic(path.join(folder, "refs", ref.revision), commit);
  }
  await download(ref, commit, await plan(ref, commit, hub), hub);
  hub.opts.onInfo?.(`${label(ref)}: commit ${commit}, downloaded into ${folder}`);
  return snapshotDir(hub, ref, commit);
}

/** The files a model load reads besides its weights, where the repo has them. */
const MODEL_FILES = [
  "config.json",
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "chat_template.jinja",
];
const INDEX = "model.safetensors.index.json";

/** The shard files a sharded index names ([] when it cannot be read: the loader says why). */
function shardsOf(index: string): string[] {
  try {
    const map = (JSON.parse(fs.readFileSync(index, "utf8")) as { weight_map?: Record<string, string> }).weight_map;
    return [...new Set(Object.values(map ?? {}))].sort();
  } catch {
    return [];
  }
}

/** The first file a cached model still needs to load (its config, then its weights), or null when it has all. */
function missingModelFile(dir: string): string | null {
  const has = (f: string) => fs.existsSync(path.join(dir, f)); // follows the symlink: a dangling one is missing
  if (!has("config.json")) return "config.json";
  if (has(INDEX)) return shardsOf(path.join(dir, INDEX)).find((s) => !has(s)) ?? null;
  return has("model.safetensors") ? null : "model.safetensors";
}

/** What a model at a commit needs from the Hub: its config files, and its weights as the index (if any) names them. */
async function modelFiles(ref: HubRef, commit: string, hub: Hub): Promise<Map<string, RemoteFile>> {
  const found = await remoteFiles(ref, commit, [...MODEL_FILES, INDEX, "model.safetensors"], hub);
  if (!found.has("config.json"))
    throw new HubError(`${label(ref)} has no config.json at commit ${commit}: not a Transformers model repo`);
  if (!found.has(INDEX)) {
    if (!found.has("model.safetensors"))
      throw new HubError(
        `${label(ref)} has no model.safetensors or ${INDEX} at commit ${commit}: prefprobe reads safetensors weights only`,
      );
    return found;
  }
  // the index says which shards to fetch (a repo may also hold a consolidated copy the loader would not read)
  await download(ref, commit, new Map([[INDEX, found.get(INDEX)!]]), hub);
  const shards = shardsOf(path.join(snapshotDir(hub, ref, commit), INDEX));
  const remote = await remoteFiles(ref, commit, shards, hub);
  const gone = shards.find((s) => !remote.has(s));
  if (gone) throw new HubError(`${INDEX} of ${label(ref)} names ${gone}, which the repo does not hold at ${commit}`);
  found.delete("model.safetensors");
  return new Map([...found, ...remote]);
}

/** What a single file of a repo needs from the Hub: itself. */
async function fileOnly(ref: HubRef, commit: string, hub: Hub): Promise<Map<string, RemoteFile>> {
  const found = await remoteFiles(ref, commit, [ref.file!], hub);
  if (!found.has(ref.file!)) throw new HubError(`${label(ref)} has no file ${ref.file} (commit ${commit})`);
  return found;
}

/** The commit a revision names on the Hub (a missing repo, gated repo or unknown revision is a HubError). */
async function remoteCommit(ref: HubRef, hub: Hub): Promise<string> {
  const ask = { name: ref.repo, revision: ref.revision, hubUrl: hub.endpoint, additionalFields: ["sha" as const] };
  const info = await callHub(ref, hub, (auth) =>
    ref.type === "dataset" ? datasetInfo({ ...ask, ...auth }) : modelInfo({ ...ask, ...auth }),
  );
  if (!REGEX_COMMIT_HASH.test(info.sha ?? ""))
    throw new HubError(`${hub.endpoint} gave no commit for ${label(ref)} (got ${JSON.stringify(info.sha ?? null)})`);
  return info.sha;
}

/** Which of `paths` the repo holds at `commit`, with their sizes and blob names (the client's: LFS sha256, else the git oid). */
async function remoteFiles(ref: HubRef, commit: string, paths: string[], hub: Hub): Promise<Map<string, RemoteFile>> {
  const infos = await callHub(ref, hub, (auth) =>
    pathsInfo({ repo: { type: ref.type, name: ref.repo }, paths, revision: commit, hubUrl: hub.endpoint, ...auth }),
  );
  const files = infos.filter((i) => i.type === "file");
  return new Map(
    files.map((i) => [i.path, { size: i.lfs?.size ?? i.size, etag: i.lfs?.oid ?? i.xetHash ?? i.oid ?? "" }]),
  );
}

const megabytes = (n: number) => `${(n / 1e6).toFixed(n < 1e7 ? 2 : 0)} MB`;

/** Downloads the files the snapshot of `commit` lacks, smallest first, reporting bytes over all of them. */
async function download(ref: HubRef, commit: string, files: Map<string, RemoteFile>, hub: Hub): Promise<void> {
  const dir = snapshotDir(hub, ref, commit);
  const todo = [...files].filter(([f]) => !fs.existsSync(path.join(dir, f))).sort((a, b) => a[1].size - b[1].size);
  if (!todo.length) return;
  const total = todo.reduce((a, [, f]) => a + f.size, 0);
  const names = todo.map(([f]) => f).join(", ");
  hub.opts.onInfo?.(`${label(ref)}: downloading ${names} (${megabytes(total)}) from ${hub.endpoint}`);
  let done = 0;
  for (const [file, remote] of todo) {
    const report = (n: number) => hub.opts.onDownload?.({ repo: ref.repo, file, done: done + n, total });
    await fetchFile({ ...ref, file }, commit, remote, hub, report);
    done += remote.size;
    report(0);
  }
}

/**
 * Downloads one file into the cache with the official client, which writes blobs/<etag>.incomplete and renames it
 * only once whole (so an interrupted download leaves no file under its final name, and a retry starts it again).
 * Progress is read from the size of that file, whatever transport the client chose.
 */
async function fetchFile(
  ref: HubRef,
  commit: string,
  remote: RemoteFile,
  hub: Hub,
  report: (bytes: number) => void,
): Promise<void> {
  const partial = path.join(repoFolder(hub, ref), "blobs", `${remote.etag}.incomplete`);
  const timer = setInterval(() => report(sizeOf(partial)), 250).unref();
  try {
    const pointer = await callHub(
      ref,
      hub,
      (auth) =>
        withoutConsoleNoise(hub, () =>
          downloadFileToCacheDir({
            repo: { type: ref.type, name: ref.repo },
            path: ref.file!,
            revision: commit,
            cacheDir: hub.cache,
            hubUrl: hub.endpoint,
            ...auth,
          }),
        ),
      true,
    );
    checkSize(ref, pointer, remote.size);
  } finally {
    clearInterval(timer);
  }
}

const sizeOf = (file: string) => {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0; // not started yet
  }
};

/** A downloaded file shorter (or longer) than the Hub said is removed with its blob, so no later run trusts it. */
function checkSize(ref: HubRef, pointer: string, size: number): void {
  const got = fs.statSync(pointer).size;
  if (got === size) return;
  const blob = fs.realpathSync(pointer);
  fs.rmSync(pointer, { force: true });
  fs.rmSync(blob, { force: true });
  throw new HubError(
    `download of ${ref.file} from ${label(ref)} gave ${got} of its ${size} bytes: removed from the cache; run again to download it afresh`,
  );
}

/**
 * Runs the client with console.debug silenced and console.info sent to onInfo: downloadFileToCacheDir announces
 * each download with console.debug, which Node writes to stdout, where it would mix with a command's output.
 */
async function withoutConsoleNoise<T>(hub: Hub, work: () => Promise<T>): Promise<T> {
  const { debug, info } = console;
  console.debug = () => {};
  console.info = (...a: unknown[]) => hub.opts.onInfo?.(a.join(" "));
  try {
    return await work();
  } finally {
    Object.assign(console, { debug, info });
  }
}

/** What the Hub answered to the last request that failed (the client's HubApiError keeps the status, not the headers). */
interface Failure {
  status?: number;
  code?: string;
}

/** Calls the client with the token and a fetch that notes each failure's X-Error-Code; errors become HubErrors. */
async function callHub<T>(
  ref: HubRef,
  hub: Hub,
  call: (auth: { accessToken?: string; fetch: typeof fetch }) => Promise<T>,
  downloading = false,
): Promise<T> {
  const last: Failure = {};
  const noting: typeof fetch = async (input, init) => {
    const res = await fetch(input, init);
    if (!res.ok) Object.assign(last, { status: res.status, code: res.headers.get("x-error-code") ?? undefined });
    return res;
  };
  // the client refuses such a token with a TypeError of its own; this says where it came from
  if (hub.token && !hub.token.startsWith("hf_"))
    throw new HubError("the Hugging Face token (HF_TOKEN, or the file $HF_HOME/token) does not start with hf_");
  try {
    return await call({ ...(hub.token && { accessToken: hub.token }), fetch: noting });
  } catch (e) {
    throw explain(e, ref, hub, last, downloading);
  }
}

/** A client error as one line saying what went wrong and what to do. */
function explain(e: unknown, ref: HubRef, hub: Hub, last: Failure, downloading: boolean): Error {
  if (e instanceof HubError) return e;
  const status = e instanceof HubApiError ? e.statusCode : last.status;
  const what = `${ref.type} ${ref.repo}`;
  const code = last.code ?? "";
  if (code === "RevisionNotFound")
    return new HubError(`revision "${ref.revision}" not found in ${what} on ${hub.endpoint}`);
  if (code === "EntryNotFound") return new HubError(`${label(ref)} has no file ${ref.file}`);
  if (code === "GatedRepo" || status === 403) {
    const page = `${hub.endpoint}/${ref.type === "dataset" ? "datasets/" : ""}${ref.repo}`;
    const token = hub.token
      ? "use a token (HF_TOKEN) of the account that did"
      : "set HF_TOKEN to a token of the account that did";
    return new HubError(`${what} is gated (${status}): accept its licence at ${page} and ${token}`);
  }
  if (status === 401 && hub.token && code !== "RepositoryNotFound")
    return new HubError(
      `${hub.endpoint} refused the token (HF_TOKEN) for ${what} (401): check that it is valid and has access`,
    );
  if (code === "RepositoryNotFound" || status === 404 || status === 401) {
    const local = ref.file ? "" : ", and there is no local folder of that name";
    const hint = hub.token ? "" : "; if it is private or gated, set HF_TOKEN";
    return new HubError(`${what} not found on ${hub.endpoint} (${status})${local}${hint}`);
  }
  if (status !== undefined) return new HubError(`${label(ref)}: the Hub answered ${status} (${firstLine(e)})`);
  const cause = (e as { cause?: { code?: string; message?: string } }).cause;
  const why = [firstLine(e), cause?.message ?? cause?.code].filter(Boolean).join(": ");
  if (downloading)
    return new HubError(
      `download of ${ref.file} from ${label(ref)} was interrupted (${why}); run again to restart it (no partial file is left under its final name)`,
    );
  return new HubError(
    `cannot reach ${hub.endpoint} for ${label(ref)} (${why}); set HF_HUB_OFFLINE=1 to use only the cache`,
  );
}

const firstLine = (e: unknown) => String(e instanceof Error ? e.message : e).split("\n")[0]!;
