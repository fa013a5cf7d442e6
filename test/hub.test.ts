// Hugging Face ids and hf:// files: a cache laid out as huggingface_hub writes it (real symlinks into blobs/,
// refs/ per branch), downloads from a loopback server that answers the requests the official client makes, the
// failures a user meets (404, gated, a dropped connection, offline), and the CLI end to end.
import { spawn } from "node:child_process";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as http from "node:http";
import * as os from "node:os";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { getHFHubCachePath } from "@huggingface/hub";
import {
  HubError,
  hubCacheDir,
  hubSourceOf,
  hubToken,
  parseHfUrl,
  parseHubId,
  resolveHubFile,
  resolveModel,
} from "../src/io/hub.js";
import { loadConfig } from "../src/io/config.js";
import { loadModelSync } from "../src/io/model.js";
import { readPairs } from "../src/io/pairs.js";
import { readSafetensors } from "../src/io/safetensors.js";
import { disposeModel } from "../src/model/llama.js";
import { logitsAndResid } from "../src/model/resid.js";
import { maxAbsDiff, useBackend } from "./helpers.js";
import { tempDir } from "./tempdirs.js";

useBackend();

const STORIES = "fixtures/models/stories260k";
const TINY_B = "fixtures/models/llama-tiny-b";
type Files = Record<string, Buffer>;

/** A fixture folder's files (the named ones), as a repo holds them. */
const filesOf = (dir: string, names: string[]): Files =>
  Object.fromEntries(names.map((n) => [n, fs.readFileSync(path.join(dir, n))]));
const STORIES_FILES = filesOf(STORIES, ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
const TINY_B_FILES = filesOf(TINY_B, [
  "config.json",
  "model.safetensors.index.json",
  "model-00001-of-00002.safetensors",
  "model-00002-of-00002.safetensors",
]);

const sha256 = (b: Buffer) => crypto.createHash("sha256").update(b).digest("hex");
/** The id git gives a file's bytes: the Hub's oid (and the cache's blob name) for a file not stored with LFS. */
const gitOid = (b: Buffer) =>
  crypto
    .createHash("sha1")
    .update(Buffer.concat([Buffer.from(`blob ${b.length}\0`), b]))
    .digest("hex");
const isLfs = (name: string) => /\.(safetensors|gz|bin|pth)$/.test(name);
/** The name a file's blob has in the cache: the LFS sha256, else the git oid. */
const blobName = (name: string, b: Buffer) => (isLfs(name) ? sha256(b) : gitOid(b));
const commitOf = (text: string) => crypto.createHash("sha1").update(text).digest("hex");

/** Puts a file into a cache repo folder as huggingface_hub does: the blob by hash, a relative symlink in the snapshot. */
function placeFile(repoDir: string, commit: string, name: string, data: Buffer): void {
  const blob = path.join(repoDir, "blobs", blobName(name, data));
  fs.mkdirSync(path.dirname(blob), { recursive: true });
  if (!fs.existsSync(blob)) fs.writeFileSync(blob, data);
  const pointer = path.join(repoDir, "snapshots", commit, name);
  fs.mkdirSync(path.dirname(pointer), { recursive: true });
  fs.symlinkSync(path.relative(path.dirname(pointer), blob), pointer);
}

function setRef(repoDir: string, ref: string, commit: string): void {
  fs.mkdirSync(path.join(repoDir, "refs"), { recursive: true });
  fs.writeFileSync(path.join(repoDir, "refs", ref), commit);
}

/** Every snapshot entry is a symlink into blobs/ that resolves, and every blob under a final name holds the bytes its name hashes to. */
function expectConsistent(repoDir: string): void {
  const walk = (d: string): string[] =>
    fs.readdirSync(d, { withFileTypes: true }).flatMap((e) => {
      const p = path.join(d, e.name);
      return e.isDirectory() ? walk(p) : [p];
    });
  const snaps = path.join(repoDir, "snapshots");
  for (const p of fs.existsSync(snaps) ? walk(snaps) : []) {
    expect(fs.lstatSync(p).isSymbolicLink(), p).toBe(true);
    expect(fs.existsSync(p), `${p} is a broken symlink`).toBe(true);
    expect(path.dirname(fs.realpathSync(p))).toBe(fs.realpathSync(path.join(repoDir, "blobs")));
  }
  const blobs = path.join(repoDir, "blobs");
  for (const b of fs.existsSync(blobs) ? fs.readdirSync(blobs) : []) {
    if (b.endsWith(".incomplete")) continue; // the client's partial file: never a final name
    const data = fs.readFileSync(path.join(blobs, b));
    expect([sha256(data), gitOid(data)], `blob ${b} does not hold the bytes its name hashes to`).toContain(b);
  }
}

/** Logits of a model folder on a few token ids (the model disposed). */
function logitsOf(dir: string, ids: number[]): Float32Array {
  const model = loadModelSync(dir);
  const { logits } = logitsAndResid(model, ids, false);
  const out = logits.dataSync() as Float32Array;
  logits.dispose();
  disposeModel(model);
  return out;
}

describe("a cache laid out as huggingface_hub writes it", () => {
  const root = tempDir("hub");
  const cache = path.join(root, "hub");
  const repoDir = path.join(cache, "models--org--tiny");
  const [A, B, C] = ["main commit", "dev commit", "broken commit"].map(commitOf) as [string, string, string];
  const shared = Buffer.from('{"do_sample": false}\n'); // in both snapshots: one blob, two symlinks
  for (const [name, data] of Object.entries(TINY_B_FILES)) placeFile(repoDir, A, name, data);
  for (const [name, data] of Object.entries(STORIES_FILES)) placeFile(repoDir, B, name, data);
  for (const c of [A, B]) placeFile(repoDir, c, "generation_config.json", shared);
  // a snapshot whose second shard's blob was deleted: its symlink dangles
  for (const [name, data] of Object.entries(TINY_B_FILES))
    if (name !== "model-00002-of-00002.safetensors") placeFile(repoDir, C, name, data);
  fs.symlinkSync(
    "../../blobs/0000000000000000000000000000000000000000",
    path.join(repoDir, "snapshots", C, "model-00002-of-00002.safetensors"),
  );
  setRef(repoDir, "main", A);
  setRef(repoDir, "dev", B);
  setRef(repoDir, "broken", C);
  const env = { HF_HUB_CACHE: cache, HF_HUB_OFFLINE: "1" }; // offline: any network use would fail the test
  const snap = (c: string) => path.join(repoDir, "snapshots", c);

  it("the test's cache is what huggingface_hub writes: relative symlinks into blobs named by content hash", () => {
    const link = path.join(snap(A), "model-00001-of-00002.safetensors");
    expect(fs.readlinkSync(link)).toBe(`../../blobs/${sha256(TINY_B_FILES["model-00001-of-00002.safetensors"]!)}`);
    expect(fs.readlinkSync(path.join(snap(B), "config.json"))).toBe(
      `../../blobs/${gitOid(STORIES_FILES["config.json"]!)}`,
    );
    expect(fs.realpathSync(path.join(snap(A), "generation_config.json"))).toBe(
      fs.realpathSync(path.join(snap(B), "generation_config.json")),
    );
  });

  it("picks the snapshot by branch, by commit hash and by org/name@rev (the id's own revision wins)", async () => {
    expect(await resolveModel("org/tiny", { env })).toBe(snap(A));
    expect(await resolveModel("org/tiny", { env, revision: "dev" })).toBe(snap(B));
    expect(await resolveModel("org/tiny@dev", { env })).toBe(snap(B));
    expect(await resolveModel("org/tiny", { env, revision: B })).toBe(snap(B));
    expect(await resolveModel(`org/tiny@${A}`, { env, revision: "dev" })).toBe(snap(A));
    expect(loadConfig(snap(A)).hiddenSize).toBe(loadConfig(TINY_B).hiddenSize);
    expect(loadConfig(snap(B)).hiddenSize).toBe(64);
    expect(loadConfig(snap(A)).hiddenSize).not.toBe(64);
    expect(hubSourceOf(snap(B))).toEqual({ type: "model", repo: "org/tiny", commit: B });
    expect(hubSourceOf(STORIES)).toBeNull();
  });

  it("the resolved snapshots load and compute what the fixture folders do", async () => {
    const exp = readSafetensors(`${TINY_B}/expected.safetensors`);
    const ids = Array.from(exp.get("input_ids")!.data as Int32Array);
    const main = logitsOf(await resolveModel("org/tiny", { env }), ids);
    expect(maxAbsDiff(main, exp.get("logits")!.data as Float32Array)).toBeLessThanOrEqual(1e-4);
    const dev = logitsOf(await resolveModel("org/tiny@dev", { env }), [1, 403, 407, 261]);
    expect(maxAbsDiff(dev, logitsOf(STORIES, [1, 403, 407, 261]))).toBe(0);
  });

  it("cache root: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub — as the client's getHFHubCachePath", async () => {
    const cases: Array<[Record<string, string>, string]> = [
      [{ HF_HUB_CACHE: "/c", HUGGINGFACE_HUB_CACHE: "/old", HF_HOME: "/h", XDG_CACHE_HOME: "/x" }, "/c"],
      [{ HUGGINGFACE_HUB_CACHE: "/old", HF_HOME: "/h", XDG_CACHE_HOME: "/x" }, "/old"],
      [{ HF_HOME: "/h", XDG_CACHE_HOME: "/x" }, "/h/hub"],
      [{ XDG_CACHE_HOME: "/x" }, "/x/huggingface/hub"],
      [{}, path.join(os.homedir(), ".cache/huggingface/hub")],
    ];
    const keys = ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"];
    const saved = Object.fromEntries(keys.map((k) => [k, process.env[k]]));
    try {
      for (const [vars, want] of cases) {
        expect(hubCacheDir(vars)).toBe(want);
        for (const k of keys) delete process.env[k];
        Object.assign(process.env, vars);
        expect(getHFHubCachePath()).toBe(want);
      }
    } finally {
      for (const k of keys) if (saved[k] === undefined) delete process.env[k];
      Object.assign(process.env, Object.fromEntries(Object.entries(saved).filter(([, v]) => v !== undefined)));
    }
    expect(hubCacheDir({ HF_HOME: "~/hf" })).toBe(path.join(os.homedir(), "hf/hub")); // Python expands "~"
    // the same cache found through HF_HOME, and HF_HUB_CACHE winning over it
    expect(await resolveModel("org/tiny", { env: { HF_HOME: root, HF_HUB_OFFLINE: "1" } })).toBe(snap(A));
    const elsewhere = { HF_HUB_CACHE: tempDir("hub"), HF_HOME: root, HF_HUB_OFFLINE: "1" };
    await expect(resolveModel("org/tiny", { env: elsewhere })).rejects.toThrow(/is not in the cache/);
  });

  it("a local folder of the id's name wins over the id", async () => {
    const here = process.cwd();
    const dir = tempDir("hub");
    fs.mkdirSync(path.join(dir, "org/tiny"), { recursive: true });
    process.chdir(dir);
    try {
      expect(await resolveModel("org/tiny", { env })).toBe("org/tiny");
    } finally {
      process.chdir(here);
    }
    expect(await resolveModel(STORIES, { env })).toBe(STORIES);
    expect(await resolveModel("no/such/folder", { env })).toBe("no/such/folder"); // not an id: the loader says it is missing
  });

  it("offline and not cached: one line naming the repo, the revision and the missing ref or file", async () => {
    const cases: Array<[string, RegExp]> = [
      ["org/tiny@nope", /^HF_HUB_OFFLINE is set and org\/tiny@nope is not in the cache \S+ \(no refs\/nope\)$/],
      ["org/other", /^HF_HUB_OFFLINE is set and org\/other@main is not in the cache \S+ \(no refs\/main\)$/],
      [
        "org/tiny@broken",
        new RegExp(
          `^HF_HUB_OFFLINE is set and org/tiny@broken is not in the cache \\S+ \\(snapshot ${C} lacks model-00002-of-00002\\.safetensors\\)$`,
        ),
      ],
      [`org/tiny@${"f".repeat(40)}`, /\(snapshot f{40} lacks config\.json\)$/],
      ["org/tiny@../../x", /^revision "\.\.\/\.\.\/x" is not a branch, tag or commit name$/],
      // a ref file that holds no commit is named with what it holds, not taken for a missing one
      [
        "org/badref",
        /^HF_HUB_OFFLINE is set and org\/badref@main is not in the cache \S+ \(refs\/main holds "garbage", not a commit hash\)$/,
      ],
      ["org/tiny@", /^org\/tiny@: not a folder, nor a Hub id \(no revision after "@"\)$/],
      ["@main", /^@main: not a folder, nor a Hub id \(no org\/name before "@"\)$/],
    ];
    setRef(path.join(cache, "models--org--badref"), "main", "garbage\n");
    for (const [id, msg] of cases) {
      const e = await resolveModel(id, { env }).catch((x: unknown) => x);
      expect(e, id).toBeInstanceOf(HubError);
      expect((e as Error).message, id).toMatch(msg);
    }
  });

  it("hf://datasets files from the cache, by branch and by @rev", async () => {
    const ds = path.join(cache, "datasets--org--pairs");
    const [M, D] = ["pairs main", "pairs dev"].map(commitOf) as [string, string];
    const full = fs.readFileSync("fixtures/data/stories/test.jsonl");
    const short = Buffer.from(full.toString().split("\n").slice(0, 3).join("\n") + "\n");
    placeFile(ds, M, "sub/test.jsonl", full);
    placeFile(ds, D, "sub/test.jsonl", short);
    setRef(ds, "main", M);
    setRef(ds, "dev", D);
    expect(fs.readlinkSync(path.join(ds, "snapshots", M, "sub/test.jsonl"))).toMatch(/^\.\.\/\.\.\/\.\.\/blobs\//);
    const main = await resolveHubFile("hf://datasets/org/pairs/sub/test.jsonl", { env });
    expect(main).toBe(path.join(ds, "snapshots", M, "sub/test.jsonl"));
    expect(readPairs(main).pairs).toEqual(readPairs("fixtures/data/stories/test.jsonl").pairs);
    const dev = await resolveHubFile("hf://datasets/org/pairs@dev/sub/test.jsonl", { env });
    expect(readPairs(dev).pairs).toHaveLength(3);
    expect(hubSourceOf(dev)).toEqual({ type: "dataset", repo: "org/pairs", commit: D, file: "sub/test.jsonl" });
    expect(await resolveHubFile("fixtures/data/stories/test.jsonl", { env })).toBe("fixtures/data/stories/test.jsonl");
    await expect(resolveHubFile("hf://datasets/org/pairs/nope.jsonl", { env })).rejects.toThrow(
      /^HF_HUB_OFFLINE is set and datasets\/org\/pairs@main is not in the cache \S+ \(snapshot [0-9a-f]{40} lacks nope\.jsonl\)$/,
    );
    await expect(resolveHubFile("hf://spaces/org/app/x.py", { env })).rejects.toThrow(/not an hf:\/\/ file address/);
  });
});

describe("ids, hf:// addresses and tokens", () => {
  it("parses ids as the Hub allows them, and hf:// addresses as HfFileSystem writes them", () => {
    expect(parseHubId("meta-llama/Llama-3.2-1B")).toEqual({ repo: "meta-llama/Llama-3.2-1B" });
    expect(parseHubId("meta-llama/Llama-3.2-1B@refs/pr/1")).toEqual({
      repo: "meta-llama/Llama-3.2-1B",
      revision: "refs/pr/1",
    });
    for (const notId of [
      "gpt2",
      "./org/name",
      "/abs/path",
      "a/b/c",
      "org--x/name",
      "org/na..me",
      "org/name-",
      "org/name@",
      "~/x",
    ])
      expect(parseHubId(notId), notId).toBeNull();
    expect(parseHfUrl("hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz")).toEqual({
      type: "dataset",
      repo: "Anthropic/hh-rlhf",
      file: "harmless-base/test.jsonl.gz",
    });
    expect(parseHfUrl("hf://datasets/org/name@refs%2Fconvert%2Fparquet/a/b.jsonl")).toEqual({
      type: "dataset",
      repo: "org/name",
      revision: "refs/convert/parquet",
      file: "a/b.jsonl",
    });
    expect(parseHfUrl("hf://org/model@v1/data.jsonl")).toEqual({
      type: "model",
      repo: "org/model",
      revision: "v1",
      file: "data.jsonl",
    });
    for (const bad of [
      "hf://datasets/org",
      "hf://datasets/org/name",
      "hf://datasets/org/name/../x",
      "datasets/org/name/x",
    ])
      expect(parseHfUrl(bad), bad).toBeNull();
  });

  it("the token: HF_TOKEN, then HUGGING_FACE_HUB_TOKEN, then the token file ($HF_TOKEN_PATH, else $HF_HOME/token)", () => {
    const home = tempDir("hub");
    expect(hubToken({ HF_HOME: home })).toBeUndefined();
    fs.writeFileSync(path.join(home, "token"), "hf_fromfile\n");
    expect(hubToken({ HF_HOME: home })).toBe("hf_fromfile");
    expect(hubToken({ HF_HOME: home, HUGGING_FACE_HUB_TOKEN: "hf_old" })).toBe("hf_old");
    expect(hubToken({ HF_HOME: home, HUGGING_FACE_HUB_TOKEN: "hf_old", HF_TOKEN: "hf_new" })).toBe("hf_new");
    fs.writeFileSync(path.join(home, "other"), "hf_other");
    expect(hubToken({ HF_HOME: home, HF_TOKEN_PATH: path.join(home, "other") })).toBe("hf_other");
  });
});

interface FakeRepo {
  commits: Record<string, Files>;
  refs: Record<string, string>;
  granted?: string; // gated: only this token may read it
}

/**
 * A loopback Hub that answers what @huggingface/hub asks: the revision's commit (/api/{type}s/{repo}/revision/{rev}),
 * paths-info, and /resolve/ with a one-byte range probe and the full GET, with the Hub's X-Error-Code on failures.
 */
class FakeHub {
  readonly repos = new Map<string, FakeRepo>(); // "models/org/name" or "datasets/org/name"
  readonly requests: string[] = [];
  readonly drop = new Set<string>(); // files whose next full download is cut off mid-body
  readonly short = new Set<string>(); // files whose next full download is a whole response of half the bytes
  private server = http.createServer((req, res) => void this.answer(req, res));
  url = "";

  async start(): Promise<this> {
    await new Promise<void>((ok) => this.server.listen(0, "127.0.0.1", ok));
    this.url = `http://127.0.0.1:${(this.server.address() as { port: number }).port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((ok) => this.server.close(ok));
  }

  private async answer(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    this.requests.push(`${req.method} ${req.url}`);
    const body = await new Promise<string>((ok) => {
      let s = "";
      req.on("data", (c) => (s += c)).on("end", () => ok(s));
    });
    const fail = (status: number, code: string, error: string) => {
      res.writeHead(status, { "content-type": "application/json", "x-error-code": code });
      res.end(JSON.stringify({ error }));
    };
    const parts = new URL(req.url!, this.url).pathname.split("/").slice(1).map(decodeURIComponent);
    const api = parts[0] === "api";
    const type = api ? parts[1]! : parts[0] === "datasets" ? "datasets" : "models";
    const at = api ? 2 : type === "datasets" ? 1 : 0;
    const name = `${parts[at]}/${parts[at + 1]}`;
    const [op, rev] = [parts[at + 2], parts[at + 3]!];
    const repo = this.repos.get(`${type}/${name}`);
    if (!repo) return fail(404, "RepositoryNotFound", "Repository not found");
    if (repo.granted && req.headers.authorization !== `Bearer ${repo.granted}`)
      return req.headers.authorization
        ? fail(403, "GatedRepo", `Access to ${name} is restricted: you have not accepted its conditions`)
        : fail(401, "GatedRepo", `Access to ${name} is restricted. You must be authenticated to access it.`);
    const commit = repo.refs[rev] ?? (repo.commits[rev] ? rev : undefined);
    if (!commit) return fail(404, "RevisionNotFound", `Invalid rev id: ${rev}`);
    const files = repo.commits[commit]!;
    if (op === "revision") {
      res.writeHead(200, { "content-type": "application/json" });
      return void res.end(
        JSON.stringify({
          _id: "x",
          id: name,
          sha: commit,
          private: false,
          gated: !!repo.granted,
          downloads: 0,
          likes: 0,
          lastModified: "2024-01-01T00:00:00.000Z",
        }),
      );
    }
    if (op === "paths-info") {
      const asked = (JSON.parse(body) as { paths: string[] }).paths.filter((p) => files[p]);
      res.writeHead(200, { "content-type": "application/json" });
      return void res.end(JSON.stringify(asked.map((p) => this.pathInfo(p, files[p]!, commit))));
    }
    if (op !== "resolve") return fail(404, "EntryNotFound", "no such endpoint");
    const file = parts.slice(at + 4).join("/");
    if (!files[file]) return fail(404, "EntryNotFound", `${file} does not exist`);
    this.serveFile(req, res, `${name}:${file}`, files[file]!, {
      etag: `"${blobName(file, files[file]!)}"`,
      "x-repo-commit": commit,
    });
  }

  private pathInfo(p: string, data: Buffer, commit: string) {
    const lfs = isLfs(p) ? { lfs: { oid: sha256(data), size: data.length, pointerSize: 134 } } : {};
    const lastCommit = { id: commit, title: "upload", date: "2024-01-01T00:00:00.000Z" };
    return { type: "file", path: p, oid: gitOid(data), size: data.length, ...lfs, lastCommit };
  }

  private serveFile(
    req: http.IncomingMessage,
    res: http.ServerResponse,
    key: string,
    data: Buffer,
    headers: Record<string, string>,
  ): void {
    const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? "");
    if (range) {
      const [a, b] = [Number(range[1]), Math.min(Number(range[2]), data.length - 1)];
      res.writeHead(206, {
        ...headers,
        "accept-ranges": "bytes",
        "content-range": `bytes ${a}-${b}/${data.length}`,
        "content-length": b - a + 1,
      });
      return void res.end(req.method === "HEAD" ? undefined : data.subarray(a, b + 1));
    }
    const half = data.subarray(0, data.length >> 1);
    if (this.short.delete(key)) {
      res.writeHead(200, { ...headers, "content-length": half.length });
      return void res.end(half);
    }
    res.writeHead(200, { ...headers, "accept-ranges": "bytes", "content-length": data.length });
    if (req.method === "HEAD") return void res.end();
    if (!this.drop.delete(key)) return void res.end(data);
    res.write(half, () => setTimeout(() => res.socket?.destroy(), 50)); // the connection drops mid-file
  }
}

const [T1, G1, S1, P1, P2, D1, D2] = ["tiny", "gated", "sharded", "pairs", "pairs dev", "dpo", "dpo v2"].map(
  commitOf,
) as string[] as [string, string, string, string, string, string, string];
const STORIES_DPO_FILES = filesOf("fixtures/models/stories260k-dpo", [
  "config.json",
  "model.safetensors",
  "tokenizer.json",
  "tokenizer_config.json",
]);
const PAIRS = fs.readFileSync("fixtures/data/stories/test.jsonl");
const HH = fs.readFileSync("fixtures/data/hh-rlhf/harmless-base-test.jsonl.gz");
const DECOYS: Files = {
  "pytorch_model.bin": Buffer.from("not wanted"),
  "original/consolidated.00.pth": Buffer.from("not wanted"),
  "README.md": Buffer.from("# tiny\n"),
};

async function fakeHub(): Promise<FakeHub> {
  const hub = await new FakeHub().start();
  hub.repos.set("models/org/tiny", { commits: { [T1]: { ...STORIES_FILES, ...DECOYS } }, refs: { main: T1 } });
  hub.repos.set("models/org/gated", { commits: { [G1]: STORIES_FILES }, refs: { main: G1 }, granted: "hf_granted" });
  const consolidated = { "consolidated.safetensors": Buffer.from("a copy the loader would not read") };
  hub.repos.set("models/org/sharded", { commits: { [S1]: { ...TINY_B_FILES, ...consolidated } }, refs: { main: S1 } });
  hub.repos.set("models/org/tiny-dpo", {
    commits: { [D1]: STORIES_DPO_FILES, [D2]: STORIES_DPO_FILES },
    refs: { main: D1, v2: D2 },
  });
  const pairs = { "test.jsonl": PAIRS, "harmless-base/test.jsonl.gz": HH };
  hub.repos.set("datasets/org/pairs", {
    commits: { [P1]: pairs, [P2]: { "test.jsonl": PAIRS.subarray(0, PAIRS.indexOf("\n") + 1) } },
    refs: { main: P1, dev: P2 },
  });
  return hub;
}

/** The message of what `work` rejects with, checked to be a one-line HubError. */
async function hubError(work: Promise<unknown>): Promise<string> {
  const e = await work.then(
    () => new Error("resolved, expected a HubError"),
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(HubError);
  expect((e as Error).message).not.toContain("\n");
  return (e as Error).message;
}

describe("downloads from a Hub (a loopback server)", () => {
  let hub: FakeHub;
  let cache: string;
  const env = () => ({ HF_HUB_CACHE: cache, HF_ENDPOINT: hub.url });
  beforeAll(async () => {
    hub = await fakeHub();
    cache = path.join(tempDir("hub"), "hub");
  });
  afterAll(() => hub.stop());

  it("fetches only what a Llama load needs, in huggingface_hub's layout; the model computes the fixture's logits", async () => {
    const progress: Array<{ done: number; total: number }> = [];
    const info: string[] = [];
    const dir = await resolveModel("org/tiny", {
      env: env(),
      onDownload: (p) => progress.push(p),
      onInfo: (l) => info.push(l),
    });
    const repoDir = path.join(cache, "models--org--tiny");
    expect(dir).toBe(path.join(repoDir, "snapshots", T1));
    expect(fs.readFileSync(path.join(repoDir, "refs/main"), "utf8")).toBe(T1);
    expect(fs.readdirSync(dir).sort()).toEqual(Object.keys(STORIES_FILES).sort());
    for (const [name, data] of Object.entries(STORIES_FILES)) {
      expect(fs.readlinkSync(path.join(dir, name))).toBe(`../../blobs/${blobName(name, data)}`);
      expect(fs.readFileSync(path.join(dir, name)).equals(data)).toBe(true);
    }
    expect(fs.readdirSync(path.join(repoDir, "blobs")).filter((b) => b.endsWith(".incomplete"))).toEqual([]);
    expectConsistent(repoDir);
    expect(hub.requests.filter((r) => /bin|original|README/.test(r))).toEqual([]);
    const total = Object.values(STORIES_FILES).reduce((a, b) => a + b.length, 0);
    expect(progress.at(-1)).toMatchObject({ repo: "org/tiny", done: total, total });
    expect(info.at(-1)).toBe(`org/tiny@main: commit ${T1}, downloaded into ${repoDir}`);
    expect(maxAbsDiff(logitsOf(dir, [1, 403, 407, 261]), logitsOf(STORIES, [1, 403, 407, 261]))).toBe(0);
  });

  it("a sharded model: the index, then the shards it names (not a consolidated copy beside them)", async () => {
    const dir = await resolveModel("org/sharded", { env: env() });
    expect(fs.readdirSync(dir).sort()).toEqual(Object.keys(TINY_B_FILES).sort());
    const exp = readSafetensors(`${TINY_B}/expected.safetensors`);
    const ids = Array.from(exp.get("input_ids")!.data as Int32Array);
    expect(maxAbsDiff(logitsOf(dir, ids), exp.get("logits")!.data as Float32Array)).toBeLessThanOrEqual(1e-4);
  });

  it("a second resolution makes no request, offline or not", async () => {
    const before = hub.requests.length;
    const dir = path.join(cache, "models--org--tiny/snapshots", T1);
    expect(await resolveModel("org/tiny", { env: { ...env(), HF_HUB_OFFLINE: "1" } })).toBe(dir);
    expect(await resolveModel("org/tiny", { env: env() })).toBe(dir);
    expect(await resolveModel(`org/tiny@${T1}`, { env: env() })).toBe(dir);
    expect(hub.requests.length).toBe(before);
  });

  it("404 for an unknown repo, an unknown revision or file: one line each, nothing cached for them", async () => {
    expect(await hubError(resolveModel("org/missing", { env: env() }))).toMatch(
      /^model org\/missing not found on http:\/\/127\.0\.0\.1:\d+ \(404\), and there is no local folder of that name; if it is private or gated, set HF_TOKEN$/,
    );
    expect(fs.existsSync(path.join(cache, "models--org--missing"))).toBe(false);
    expect(await hubError(resolveModel("org/tiny@nope", { env: env() }))).toMatch(
      /^revision "nope" not found in model org\/tiny on http:\/\/127\.0\.0\.1:\d+$/,
    );
    expect(fs.existsSync(path.join(cache, "models--org--tiny/refs/nope"))).toBe(false);
    expect(await hubError(resolveHubFile("hf://datasets/org/pairs/nope.jsonl", { env: env() }))).toBe(
      `datasets/org/pairs@main has no file nope.jsonl (commit ${P1})`,
    );
    expectConsistent(path.join(cache, "models--org--tiny"));
  });

  it("gated: 401 without a token, 403 with one not granted, each a line saying to accept the licence and set HF_TOKEN; the granted token (from the token file) downloads it", async () => {
    expect(await hubError(resolveModel("org/gated", { env: env() }))).toMatch(
      /^model org\/gated is gated \(401\): accept its licence at http:\/\/127\.0\.0\.1:\d+\/org\/gated and set HF_TOKEN to a token of the account that did$/,
    );
    expect(await hubError(resolveModel("org/gated", { env: { ...env(), HF_TOKEN: "hf_other" } }))).toMatch(
      /^model org\/gated is gated \(403\): accept its licence at \S+ and use a token \(HF_TOKEN\) of the account that did$/,
    );
    expect(await hubError(resolveModel("org/gated", { env: { ...env(), HF_TOKEN: "granted" } }))).toMatch(
      /does not start with hf_/,
    );
    expectConsistent(path.join(cache, "models--org--gated"));
    const home = tempDir("hub");
    fs.writeFileSync(path.join(home, "token"), "hf_granted\n");
    const dir = await resolveModel("org/gated", { env: { ...env(), HF_HOME: home } });
    expect(fs.readdirSync(dir).sort()).toEqual(Object.keys(STORIES_FILES).sort());
  });

  it("a connection dropped mid-file: one line, the cache stays consistent, and a retry completes it", async () => {
    const fresh = { HF_HUB_CACHE: path.join(tempDir("hub"), "hub"), HF_ENDPOINT: hub.url };
    const repoDir = path.join(fresh.HF_HUB_CACHE, "models--org--tiny");
    hub.drop.add("org/tiny:model.safetensors");
    expect(await hubError(resolveModel("org/tiny", { env: fresh }))).toMatch(
      /^download of model\.safetensors from org\/tiny@main was interrupted \(terminated: other side closed\); run again to restart it/,
    );
    expectConsistent(repoDir);
    expect(fs.existsSync(path.join(repoDir, "snapshots", T1, "model.safetensors"))).toBe(false);
    const partial = `${sha256(STORIES_FILES["model.safetensors"]!)}.incomplete`;
    expect(fs.readdirSync(path.join(repoDir, "blobs"))).toContain(partial); // the client's partial file, not a final name
    await expect(resolveModel("org/tiny", { env: { ...fresh, HF_HUB_OFFLINE: "1" } })).rejects.toThrow(
      new RegExp(`\\(snapshot ${T1} lacks model\\.safetensors\\)$`),
    );
    const dir = await resolveModel("org/tiny", { env: fresh });
    expectConsistent(repoDir);
    expect(fs.readdirSync(path.join(repoDir, "blobs"))).not.toContain(partial);
    expect(maxAbsDiff(logitsOf(dir, [1, 403, 407]), logitsOf(STORIES, [1, 403, 407]))).toBe(0);
  });

  it("a body shorter than the file the Hub listed is removed, not kept under its final name", async () => {
    const fresh = { HF_HUB_CACHE: path.join(tempDir("hub"), "hub"), HF_ENDPOINT: hub.url };
    hub.short.add("org/tiny:tokenizer.json");
    const size = STORIES_FILES["tokenizer.json"]!.length;
    expect(await hubError(resolveModel("org/tiny", { env: fresh }))).toBe(
      `download of tokenizer.json from org/tiny@main gave ${size >> 1} of its ${size} bytes: removed from the cache; run again to download it afresh`,
    );
    expectConsistent(path.join(fresh.HF_HUB_CACHE, "models--org--tiny"));
    expect(fs.existsSync(path.join(fresh.HF_HUB_CACHE, "models--org--tiny/snapshots", T1, "tokenizer.json"))).toBe(
      false,
    );
  });

  it("hf://datasets files: by branch and by @rev, nested paths included", async () => {
    const hh = await resolveHubFile("hf://datasets/org/pairs/harmless-base/test.jsonl.gz", { env: env() });
    expect(hh).toBe(path.join(cache, "datasets--org--pairs/snapshots", P1, "harmless-base/test.jsonl.gz"));
    expect(fs.readlinkSync(hh)).toBe(`../../../blobs/${sha256(HH)}`);
    expect(fs.readFileSync(hh).equals(HH)).toBe(true);
    expect(readPairs(hh, { skipBad: true }).pairs).toEqual(
      readPairs("fixtures/data/hh-rlhf/harmless-base-test.jsonl.gz", { skipBad: true }).pairs,
    );
    const dev = await resolveHubFile("hf://datasets/org/pairs@dev/test.jsonl", { env: env() });
    expect(readPairs(dev).pairs).toHaveLength(1);
    expect(fs.readFileSync(path.join(cache, "datasets--org--pairs/refs/dev"), "utf8")).toBe(P2);
    expectConsistent(path.join(cache, "datasets--org--pairs"));
  });

  it("with the server stopped, cached ids still resolve (offline or not); an uncached one says the Hub cannot be reached", async () => {
    await hub.stop();
    const dir = path.join(cache, "models--org--tiny/snapshots", T1);
    expect(await resolveModel("org/tiny", { env: { ...env(), HF_HUB_OFFLINE: "1" } })).toBe(dir);
    expect(await resolveModel("org/tiny", { env: env() })).toBe(dir);
    expect(await hubError(resolveModel("org/never", { env: env() }))).toMatch(
      /^cannot reach http:\/\/127\.0\.0\.1:\d+ for org\/never@main \(fetch failed: [^)]+\); set HF_HUB_OFFLINE=1 to use only the cache$/,
    );
    hub = await fakeHub(); // for afterAll
  });
});

/** Runs the compiled CLI without blocking this process (the loopback Hub answers from it), with the HF_ variables given. */
function cli(args: string[], vars: Record<string, string>): Promise<{ code: number | null; out: string; err: string }> {
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !/^(HF_|HUGGING|TRANSFORMERS_OFFLINE|XDG_CACHE)/.test(k)),
  );
  const child = spawn(process.execPath, [path.resolve("dist/src/cli.js"), ...args], { env: { ...env, ...vars } });
  let [out, err] = ["", ""];
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (err += d));
  return new Promise((ok) => child.on("close", (code) => ok({ code, out, err })));
}

describe("the CLI with Hub ids", () => {
  let hub: FakeHub;
  let vars: Record<string, string>;
  beforeAll(async () => {
    hub = await fakeHub();
    vars = { HF_HUB_CACHE: path.join(tempDir("hub"), "hub"), HF_ENDPOINT: hub.url };
  });
  afterAll(() => hub.stop());

  it("generate --model org/name prints what the local folder prints (stdout only the text), then works offline", async () => {
    const args = ["generate", "--text", "Once upon a time", "--steps", "12"];
    const local = await cli([...args, "--model", STORIES], {});
    const fetched = await cli([...args, "--model", "org/tiny"], vars);
    expect(fetched.code, fetched.err).toBe(0);
    expect(fetched.out).toBe(local.out);
    expect(fetched.err).toMatch(
      /org\/tiny@main: downloading .*config\.json, .*model\.safetensors \(1\.05 MB\) from http/,
    );
    const offline = await cli([...args, "--model", "org/tiny"], { ...vars, HF_HUB_OFFLINE: "1" });
    expect(offline.out).toBe(local.out);
    expect(offline.err).toContain(`org/tiny@main: commit ${T1}, from the cache`);
  });

  it("a ref holding no commit, and an id with nothing on one side of its @: one line each, naming it", async () => {
    const cache = path.join(tempDir("hub"), "hub");
    setRef(path.join(cache, "models--org--badref"), "main", "garbage");
    const offline = { HF_HUB_CACHE: cache, HF_HUB_OFFLINE: "1" };
    const cases: Array<[string, RegExp]> = [
      ["org/badref", /org\/badref@main is not in the cache \S+ \(refs\/main holds "garbage", not a commit hash\)$/],
      ["org/name@", /^prefprobe: error: org\/name@: not a folder, nor a Hub id \(no revision after "@"\)$/],
      ["@main", /^prefprobe: error: @main: not a folder, nor a Hub id \(no org\/name before "@"\)$/],
    ];
    for (const [id, msg] of cases) {
      const r = await cli(["generate", "--model", id, "--steps", "2"], offline);
      expect(r.code, id).toBe(1);
      const lines = r.err
        .trim()
        .split("\n")
        .filter((l) => !l.startsWith("backend:"));
      expect(lines, id).toEqual([expect.stringMatching(msg)]);
    }
  });

  it("an id the Hub does not know: one line and exit 1", async () => {
    const r = await cli(["generate", "--model", "org/missing", "--revision", "v1", "--steps", "2"], vars);
    expect(r.code).toBe(1);
    const lines = r.err
      .trim()
      .split("\n")
      .filter((l) => !l.startsWith("backend:"));
    expect(lines).toEqual([
      expect.stringMatching(/^prefprobe: error: model org\/missing not found on http:\/\/127\.0\.0\.1:\d+ \(404\)/),
    ]);
  });

  it("run with hub ids and an hf:// pairs file records repo and commit; --resume with the same ids continues, another commit is refused", async () => {
    const out = path.join(tempDir("hub"), "run");
    const args = [
      "run",
      "--base",
      "org/tiny",
      "--tuned",
      "org/tiny-dpo",
      "--pairs",
      "hf://datasets/org/pairs/test.jsonl",
      "--limit",
      "4",
      "--out",
      out,
      "--bootstrap",
      "100",
      "--stability",
      "2",
    ];
    const first = await cli(args, vars);
    expect(first.code, first.err).toBe(0);
    const source = {
      base: { type: "model", repo: "org/tiny", commit: T1 },
      tuned: { type: "model", repo: "org/tiny-dpo", commit: D1 },
      pairs: { type: "dataset", repo: "org/pairs", commit: P1, file: "test.jsonl" },
    };
    const results = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8"));
    expect(results.hub).toEqual(source);
    expect(results.inputs.base).toBe(path.join(vars.HF_HUB_CACHE!, "models--org--tiny/snapshots", T1));
    expect(JSON.parse(fs.readFileSync(path.join(out, "manifest.json"), "utf8")).hub).toEqual(source);
    const again = await cli([...args, "--resume"], { ...vars, HF_HUB_OFFLINE: "1" });
    expect(again.code, again.err).toBe(0);
    const moved = await cli([...args.map((a) => (a === "org/tiny-dpo" ? "org/tiny-dpo@v2" : a)), "--resume"], vars);
    expect(moved.code).toBe(1);
    expect(moved.err.trim().split("\n").at(-1)).toMatch(
      /^prefprobe: error: --resume: the run in \S+ was made with other inputs: .*hub\.tuned\.commit: "[0-9a-f]{40}" vs "[0-9a-f]{40}"/,
    );
  });
});
