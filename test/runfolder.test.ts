// A run folder is one run's: a second run into it is refused while the first holds its lock, a killed run's lock
// is taken over only on --resume (or --force), a failing run leaves no folder it made, and a folder of other
// files is not written into without --force.
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { pathToFileURL } from "node:url";
import { describe, expect, it } from "vitest";
import { runCli, tmpDir } from "./helpers.js";
import { tempDir } from "./tempdirs.js";

const MODEL = "fixtures/models/stories260k";
const TUNED = "fixtures/models/stories260k-dpo";
const PAIRS = "fixtures/data/stories/test.jsonl";
const FAST = ["--bootstrap", "100", "--stability", "2", "--workers", "1"];
const run = (out: string, ...more: string[]) =>
  runCli("run", "--base", MODEL, "--tuned", TUNED, "--pairs", PAIRS, "--out", out, "--limit", "6", ...FAST, ...more);
const lastLine = (err: string) => err.trim().split("\n").at(-1)!;

/** Runs the CLI without waiting; resolves with its exit code, pid and stderr. */
function start(...args: string[]): Promise<{ code: number | null; pid: number; err: string }> {
  const child = spawn(process.execPath, [path.resolve("dist/src/cli.js"), ...args], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  return new Promise((resolve) => child.on("close", (code) => resolve({ code, pid: child.pid!, err })));
}

/** A pid that no process has now: one that ran and exited. */
const deadPid = (): number => spawnSync(process.execPath, ["-e", ""]).pid!;

const writeLock = (dir: string, pid: number) =>
  fs.writeFileSync(path.join(dir, "run.lock"), JSON.stringify({ pid, host: os.hostname(), started: "then" }));

describe("a run folder", () => {
  it("refuses a second run started into it at the same time, naming the first; the first's records are whole", async () => {
    const out = path.join(tmpDir(), "shared");
    const args = ["run", "--base", MODEL, "--tuned", TUNED, "--pairs", PAIRS, "--out", out, "--limit", "40", ...FAST];
    const [a, b] = await Promise.all([start(...args), start(...args)]);
    const [won, lost] = a.code === 0 ? [a, b] : [b, a];
    expect(won.code, won.err).toBe(0);
    expect(lost.code).toBe(1);
    expect(lastLine(lost.err)).toMatch(new RegExp(`in use by another prefprobe run \\(pid ${won.pid} on `));
    expect(fs.readFileSync(path.join(out, "pairs.jsonl"), "utf8").trim().split("\n")).toHaveLength(40);
    expect(fs.existsSync(path.join(out, "run.lock"))).toBe(false); // released at the end
    expect(runCli(...args, "--resume").code).toBe(0);
  });

  it("a killed run's lock is taken over by --resume and refused otherwise; a live holder's never", () => {
    const out = path.join(tmpDir(), "run");
    expect(run(out).code).toBe(0);
    writeLock(out, deadPid());
    const plain = run(out);
    expect(plain.code).toBe(1);
    expect(lastLine(plain.err)).toMatch(
      /holds a run that was stopped \(pid \d+ .*\): continue it with --resume or replace it with --force/,
    );
    const resumed = run(out, "--resume");
    expect(resumed.code, resumed.err).toBe(0);
    expect(fs.existsSync(path.join(out, "run.lock"))).toBe(false);
    writeLock(out, process.pid); // this test's own process: alive
    const busy = run(out, "--resume");
    expect(busy.code).toBe(1);
    expect(lastLine(busy.err)).toMatch(new RegExp(`in use by another prefprobe run \\(pid ${process.pid} on `));
    expect(fs.existsSync(path.join(out, "results.json"))).toBe(true); // nothing lost
  });

  it("a process that exits holding a lock (a second Ctrl-C or SIGTERM stops at once) removes it on its way out", () => {
    const dir = tmpDir();
    const lib = JSON.stringify(pathToFileURL(path.resolve("dist/src/io/runfolder.js")).href);
    const code = `import { lockRun } from ${lib};
      lockRun(process.argv[1], { takeOver: false });
      console.log(JSON.parse(readFileSync(process.argv[1] + "/run.lock", "utf8")).pid === process.pid);
      process.exit(130);`;
    const r = spawnSync(
      process.execPath,
      ["--input-type=module", "-e", `import { readFileSync } from "node:fs"; ${code}`, dir],
      { encoding: "utf8" },
    );
    expect(r.status, r.stderr).toBe(130);
    expect(r.stdout.trim()).toBe("true"); // it held the lock
    expect(fs.existsSync(path.join(dir, "run.lock"))).toBe(false);
    // a lock released before the exit is not touched again: another holder's lock stays
    const other = `import { lockRun } from ${lib};
      import { writeFileSync } from "node:fs";
      lockRun(process.argv[1], { takeOver: false })();
      writeFileSync(process.argv[1] + "/run.lock", JSON.stringify({ pid: 1, host: "elsewhere", started: "then" }));
      process.exit(0);`;
    expect(spawnSync(process.execPath, ["--input-type=module", "-e", other, dir]).status).toBe(0);
    expect(JSON.parse(fs.readFileSync(path.join(dir, "run.lock"), "utf8")).host).toBe("elsewhere");
  });

  it("a run that fails before writing leaves no folder it made", () => {
    const parent = tmpDir();
    const out = path.join(parent, "new", "deeper");
    const r = runCli(
      "run",
      "--base",
      MODEL,
      "--tuned",
      TUNED,
      "--pairs",
      path.join(parent, "missing.jsonl"),
      "--out",
      out,
    );
    expect(r.code).toBe(1);
    expect(fs.existsSync(path.join(parent, "new"))).toBe(false);
  });

  it("a folder of other files is not written into without --force, and --force keeps them", () => {
    const out = tmpDir();
    fs.writeFileSync(path.join(out, "notes.txt"), "mine");
    const r = run(out);
    expect(r.code).toBe(1);
    expect(lastLine(r.err)).toMatch(
      /holds files that are not a prefprobe run \(notes\.txt\): choose a new or empty folder, or --force/,
    );
    expect(fs.readdirSync(out)).toEqual(["notes.txt"]);
    expect(run(out, "--force").code).toBe(0);
    expect(fs.readFileSync(path.join(out, "notes.txt"), "utf8")).toBe("mine");
  });

  it("merge of whole runs says they are not shards", () => {
    const [a, b] = [path.join(tmpDir(), "a"), path.join(tmpDir(), "b")];
    expect(run(a).code).toBe(0);
    expect(run(b).code).toBe(0);
    const r = runCli("merge", path.join(tmpDir(), "m"), a, b);
    expect(r.code).toBe(1);
    expect(lastLine(r.err)).toMatch(
      /a is a whole run \(made without --shard\), not a shard: there is nothing to merge$/,
    );
  });
});

describe("manifests from before a setting existed", () => {
  it("read a missing setting as its default, so --resume does not refuse the folder over it", async () => {
    const { DEFAULT_SETTINGS } = await import("../src/analysis/settings.js");
    const { manifestDiff, readManifest, writeManifest } = await import("../src/io/runfolder.js");
    const dir = tempDir("old-manifest");
    const now = {
      schema: "prefprobe.manifest/2" as const,
      inputs: { base: "b", tuned: "t", pairs: "p" },
      fingerprints: { base: "1", tuned: "2", pairs: "3" },
      selection: { limit: null, max_tokens: 512, skip_bad: false, memory_budget: null },
      settings: { ...DEFAULT_SETTINGS } as Record<string, unknown>,
      n_pairs: 3,
      batches: [[0, 3]] as Array<[number, number]>,
      sums_size: 4,
      shard: null,
    };
    const [newest, ...rest] = Object.keys(DEFAULT_SETTINGS).reverse();
    const old = { ...now, settings: Object.fromEntries(rest.map((k) => [k, now.settings[k]])) };
    writeManifest(dir, old);
    expect(readManifest(dir).settings[newest!]).toEqual(now.settings[newest!]);
    expect(manifestDiff(readManifest(dir), now)).toEqual([]);
    // a setting that was recorded and differs is still a mismatch
    writeManifest(dir, { ...now, settings: { ...now.settings, seed: 9 } });
    expect(manifestDiff(readManifest(dir), now)).toEqual(["settings.seed: 9 vs 0"]);
  });
});

describe("the tokenizer a run's pairs were tokenized with", () => {
  it("a changed tokenizer file refuses --resume, naming it; a folder from before it was recorded resumes", () => {
    const dir = tempDir("tok-resume");
    const base = path.join(dir, "base");
    fs.cpSync(MODEL, base, { recursive: true });
    const out = path.join(dir, "out");
    const go = (...more: string[]) =>
      runCli("run", "--base", base, "--tuned", TUNED, "--pairs", PAIRS, "--out", out, "--limit", "2", ...FAST, ...more);
    expect(go().code).toBe(0);
    const manifest = JSON.parse(fs.readFileSync(path.join(out, "manifest.json"), "utf8"));
    expect(manifest.fingerprints.tokenizer).toMatch(/^[0-9a-f]{64}$/);
    // the same bytes resume; an edited tokenizer_config.json (a chat template, say) does not
    fs.rmSync(path.join(out, "results.json"));
    expect(go("--resume").code).toBe(0);
    const cfgFile = path.join(base, "tokenizer_config.json");
    fs.writeFileSync(cfgFile, JSON.stringify({ ...JSON.parse(fs.readFileSync(cfgFile, "utf8")), chat_template: "x" }));
    fs.rmSync(path.join(out, "results.json"));
    const refused = go("--resume");
    expect(refused.code).not.toBe(0);
    expect(lastLine(refused.err)).toMatch(
      /--resume: the run in .* was made with other inputs: fingerprints\.tokenizer: /,
    );
    // a manifest without the field (written before it existed) is not refused over it
    delete manifest.fingerprints.tokenizer;
    fs.writeFileSync(path.join(out, "manifest.json"), JSON.stringify(manifest));
    expect(go("--resume").code).toBe(0);
  });
});
