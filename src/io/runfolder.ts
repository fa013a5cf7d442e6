// A run folder that survives crashes: manifest.json (what the run is: inputs, their fingerprints, settings,
// batches, shard), pairs.jsonl (one record per pair) and pairs.bin (each pair's sums, fixed-size float64
// records), both appended and fsync'd as batches complete, so `--resume` continues where a run stopped.
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import type { PairRecord, PairState } from "../analysis/schema.js";
import { DEFAULT_SETTINGS } from "../analysis/settings.js";
import type { HubSource } from "./hub.js";
import { writeFileAtomic } from "./model.js";

/** A run folder that cannot be used as asked. */
export class RunFolderError extends Error {
  override name = "RunFolderError";
}

/** What a run is; two runs (or shards) with the same manifest but `shard` compute the same numbers. */
export interface Manifest {
  schema: "prefprobe.manifest/2";
  inputs: { base: string; tuned: string; pairs: string };
  hub?: Record<string, HubSource>; // the inputs that came from a Hugging Face cache: repo and commit (absent when none did)
  /** sha256 of each model folder's config and weights, of the pairs file, and of the tokenizer files the pairs were tokenized with (the base's; absent in folders from before it was recorded). */
  fingerprints: { base: string; tuned: string; pairs: string; tokenizer?: string };
  selection: { limit: number | null; max_tokens: number; skip_bad: boolean; memory_budget: number | null };
  settings: Record<string, unknown>;
  n_pairs: number;
  batches: Array<[number, number]>;
  sums_size: number;
  shard: { index: number; count: number } | null;
}

const FILES = { manifest: "manifest.json", records: "pairs.jsonl", sums: "pairs.bin" } as const;
/** Files a finished run adds; results.json is written last, so its presence means the run finished. */
export const FINAL_FILES = ["activations.safetensors", "subspace.safetensors", "report.html", "results.json"] as const;

/** sha256 of a file's bytes, read in chunks. */
export function fileHash(file: string): string {
  const h = crypto.createHash("sha256");
  const buf = Buffer.alloc(1 << 20);
  const fd = fs.openSync(file, "r");
  try {
    for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0;) h.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest("hex");
}

/** The files a model folder's text is tokenized and templated with (the pairs' ids depend on them). */
export const TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] as const;

/** sha256 over the tokenizer files a folder has (names and bytes); "" when it has none. */
export function tokenizerHash(dir: string): string {
  const present = TOKENIZER_FILES.filter((f) => fs.existsSync(path.join(dir, f)));
  if (!present.length) return "";
  const h = crypto.createHash("sha256");
  for (const f of present) h.update(`${f}\0${fileHash(path.join(dir, f))}\0`);
  return h.digest("hex");
}

/**
 * Makes sure `dir` is a folder this process can write, creating missing parents one level at a time (a plain
 * recursive mkdir never returns on some paths, e.g. under /proc), and returns the folders it made. Fails with a
 * one-line reason.
 */
export function ensureWritableDir(dir: string, flag = "--out"): string[] {
  const abs = path.resolve(dir);
  const missing: string[] = [];
  let p = abs;
  while (!fs.existsSync(p)) {
    missing.unshift(p);
    const up = path.dirname(p);
    if (up === p) break;
    p = up;
  }
  if (fs.existsSync(p) && !fs.statSync(p).isDirectory())
    throw new RunFolderError(`${flag} ${dir}: ${p} exists and is not a folder`);
  try {
    for (const m of missing) fs.mkdirSync(m);
    const probe = path.join(abs, `.write-test-${process.pid}`);
    fs.writeFileSync(probe, "");
    fs.rmSync(probe);
  } catch (e) {
    throw new RunFolderError(`cannot write to ${flag} ${dir} (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
  return missing;
}

/** Removes the folders ensureWritableDir made (`made`, outermost first) where they are still empty. */
export function removeIfEmpty(made: string[]): void {
  for (const d of [...made].reverse()) {
    try {
      fs.rmdirSync(d);
    } catch {
      return; // not empty (or gone): what is in it stays
    }
  }
}

/** Whether a folder already holds (part of) a run. */
export const holdsRun = (dir: string): boolean =>
  [FILES.manifest, FILES.records, FILES.sums, ...FINAL_FILES].some((f) => fs.existsSync(path.join(dir, f)));

/** The lock file a run holds in its folder while it runs: who holds it. */
const LOCK = "run.lock";
interface LockHolder {
  pid: number;
  host: string;
  started: string;
}

const readHolder = (file: string): LockHolder | null => {
  try {
    const h = JSON.parse(fs.readFileSync(file, "utf8")) as LockHolder;
    return Number.isInteger(h.pid) && typeof h.host === "string" ? h : null;
  } catch {
    return null; // gone, or written by a process killed mid-write
  }
};

/** Whether process `pid` of this host is running (EPERM: it is, under another user). */
function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Takes `dir`'s run lock (run.lock: pid, host, start time), so a second run into the same folder is refused at
 * once, naming the holder. A lock left by a run that was killed (its pid is gone on this host) is taken over
 * when `takeOver` (--resume, --force, or a folder holding no run yet), else refused with how to go on. A lock
 * from another host cannot be checked and counts as held. Returns the release, which removes the file if it is
 * still this process's; a process that exits first (a second Ctrl-C stops at once) releases it on its way out.
 */
export function lockRun(dir: string, opts: { takeOver: boolean }): () => void {
  const file = path.join(dir, LOCK);
  const me: LockHolder = { pid: process.pid, host: os.hostname(), started: new Date().toISOString() };
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      fs.writeFileSync(file, JSON.stringify(me) + "\n", { flag: "wx" });
      const release = () => {
        process.off("exit", release);
        if (readHolder(file)?.pid === me.pid) fs.rmSync(file, { force: true });
      };
      process.on("exit", release);
      return release;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST")
        throw new RunFolderError(`cannot lock ${dir} (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
    }
    const h = readHolder(file);
    const who = h ? `pid ${h.pid} on ${h.host}, started ${h.started}` : "an unreadable run.lock";
    if (h && (h.host !== me.host || pidAlive(h.pid)))
      throw new RunFolderError(
        `--out ${dir} is in use by another prefprobe run (${who})${h.host !== me.host ? "; if that run is gone, delete its run.lock" : ""}`,
      );
    if (!opts.takeOver)
      throw new RunFolderError(
        `--out ${dir} holds a run that was stopped (${who}): continue it with --resume or replace it with --force`,
      );
    fs.rmSync(file, { force: true }); // a killed run's: taken over
  }
  throw new RunFolderError(`--out ${dir}: another prefprobe run took its lock at the same moment`);
}

/** Removes every file a run writes (for --force). */
export function clearRun(dir: string): void {
  for (const f of [FILES.manifest, FILES.records, FILES.sums, ...FINAL_FILES])
    fs.rmSync(path.join(dir, f), { force: true });
}

export function writeManifest(dir: string, m: Manifest): void {
  writeFileAtomic(path.join(dir, FILES.manifest), JSON.stringify(m, null, 1) + "\n");
}

export function readManifest(dir: string): Manifest {
  const file = path.join(dir, FILES.manifest);
  if (!fs.existsSync(file))
    throw new RunFolderError(
      `${dir} has no ${FILES.manifest}: not a prefprobe run folder (or one from an older version)`,
    );
  try {
    const m = JSON.parse(fs.readFileSync(file, "utf8")) as Manifest;
    if ((m.schema as string) === "prefprobe.manifest/1")
      throw new RunFolderError(
        `${dir} was made by an older prefprobe, whose records hold gains by position (manifest/1, now /2): start it again with --force`,
      );
    if (m.schema !== "prefprobe.manifest/2") throw new Error("schema");
    // a setting added after this folder was made ran at its default: a new setting's default keeps the old behaviour
    return { ...m, settings: { ...DEFAULT_SETTINGS, ...m.settings } };
  } catch (e) {
    if (e instanceof RunFolderError) throw e;
    throw new RunFolderError(`${file}: not a prefprobe manifest`);
  }
}

/** The fields in which two manifests differ (shard ignored when `ignoreShard`), as "key: a vs b" lines. */
export function manifestDiff(a: Manifest, b: Manifest, ignoreShard = false): string[] {
  const out: string[] = [];
  const walk = (x: unknown, y: unknown, key: string) => {
    if (ignoreShard && key === "shard") return;
    if (
      x !== null &&
      y !== null &&
      typeof x === "object" &&
      typeof y === "object" &&
      !Array.isArray(x) &&
      !Array.isArray(y)
    ) {
      for (const k of new Set([...Object.keys(x), ...Object.keys(y)]))
        walk((x as Record<string, unknown>)[k], (y as Record<string, unknown>)[k], key ? `${key}.${k}` : k);
    } else if (JSON.stringify(x) !== JSON.stringify(y)) {
      const show = (v: unknown) => JSON.stringify(v) ?? "undefined";
      if (Array.isArray(x) && Array.isArray(y)) {
        // a whole list (the batches) says nothing; its lengths and first difference do
        const at = x.findIndex((v, i) => JSON.stringify(v) !== JSON.stringify(y[i]));
        const first = at < 0 ? x.length : at;
        out.push(
          `${key}: ${x.length} vs ${y.length} entries, first different at [${first}]: ${show(x[first])} vs ${show(y[first])}`,
        );
      } else out.push(`${key}: ${show(x)} vs ${show(y)}`);
    }
  };
  walk(a, b, "");
  return out;
}

/** Appends pair states to pairs.bin and pairs.jsonl, each batch fsync'd before the next begins. */
export class RunLog {
  private records: number;
  private sums: number;

  constructor(
    readonly dir: string,
    readonly sumsSize: number,
  ) {
    this.sums = fs.openSync(path.join(dir, FILES.sums), "a");
    this.records = fs.openSync(path.join(dir, FILES.records), "a");
  }

  /** Writes the states' sums, then their records (a record is only trusted when its sums are on disk). */
  append(states: PairState[]): void {
    for (const st of states) {
      if (st.sums.length !== this.sumsSize)
        throw new Error(`pair ${st.record.index}: ${st.sums.length} sums, expected ${this.sumsSize}`);
      fs.writeSync(this.sums, new Uint8Array(st.sums.buffer, st.sums.byteOffset, st.sums.byteLength));
    }
    fs.fsyncSync(this.sums);
    fs.writeSync(this.records, states.map((st) => JSON.stringify(st.record) + "\n").join(""));
    fs.fsyncSync(this.records);
  }

  close(): void {
    fs.closeSync(this.sums);
    fs.closeSync(this.records);
  }
}

/**
 * The pair states a run folder holds: whole lines of pairs.jsonl with their sums in pairs.bin, cut back to the
 * whole batches of the manifest (a batch is kept only if all its pairs are there). With `truncate`, the files
 * are cut to exactly those states, so appending continues cleanly.
 */
export function readStates(dir: string, m: Manifest, opts: { truncate?: boolean } = {}): PairState[] {
  const recFile = path.join(dir, FILES.records);
  const sumFile = path.join(dir, FILES.sums);
  const text = fs.existsSync(recFile) ? fs.readFileSync(recFile, "utf8") : "";
  const lines = text.split("\n");
  lines.pop(); // the text after the last newline: "" or a line cut short by a crash
  const records: PairRecord[] = [];
  for (const line of lines) {
    try {
      records.push(JSON.parse(line) as PairRecord);
    } catch {
      break;
    }
  }
  const bytes = fs.existsSync(sumFile) ? fs.readFileSync(sumFile) : Buffer.alloc(0);
  const recBytes = m.sums_size * 8;
  const count = Math.min(records.length, Math.floor(bytes.length / recBytes));
  // keep whole batches of this run (or shard), in order
  const states: PairState[] = [];
  let k = 0;
  for (const [start, end] of m.batches) {
    if (k + (end - start) > count) break;
    const batch = records.slice(k, k + end - start);
    if (batch.some((r, i) => r.index !== start + i))
      throw new RunFolderError(`${recFile}: records out of order at line ${k + 1} (expected pair ${start})`);
    batch.forEach((r, i) => {
      const sums = new Float64Array(m.sums_size);
      new Uint8Array(sums.buffer).set(bytes.subarray((k + i) * recBytes, (k + i + 1) * recBytes));
      states.push({ record: r, sums });
    });
    k += end - start;
  }
  if (opts.truncate && fs.existsSync(recFile)) {
    fs.truncateSync(
      recFile,
      lines.slice(0, states.length).reduce((a, l) => a + Buffer.byteLength(l) + 1, 0),
    );
    fs.truncateSync(sumFile, states.length * recBytes);
  }
  return states;
}
