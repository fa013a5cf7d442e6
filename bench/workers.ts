// Worker-thread bench: the demo run's scoring stage with 1 worker and with one per core, as a ratio measured in
// one run (the machine is noisy), and a check that both wrote the same pairs.
// Run (after npm ci, which builds dist/): npx tsx bench/workers.ts [pairs]
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

const limit = process.argv[2] ?? "120";
const cores = os.availableParallelism();
const scoring = (workers: number) => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), "prefprobe-bench-"));
  const args = [
    "dist/src/cli.js",
    "run",
    "--base",
    "fixtures/models/stories260k",
    "--tuned",
    "fixtures/models/stories260k-dpo",
    "--pairs",
    "fixtures/data/stories/test.jsonl",
    "--limit",
    limit,
    "--out",
    out,
    "--workers",
    String(workers),
    "--bootstrap",
    "100",
    "--stability",
    "2",
  ];
  const r = spawnSync(process.execPath, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(r.stderr);
  const ms = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")).timings_ms
    .scoring_and_patching as number;
  return { ms, bin: fs.readFileSync(path.join(out, "pairs.bin")) };
};
const one = scoring(1);
const all = scoring(cores);
console.log(
  `scoring ${limit} demo pairs: 1 worker ${(one.ms / 1000).toFixed(1)} s, ${cores} workers ${(all.ms / 1000).toFixed(1)} s → ${(one.ms / all.ms).toFixed(2)}x (target ≥ 1.7x on 2 cores; includes starting the workers and loading the models in each)`,
);
console.log(`pairs.bin identical: ${one.bin.equals(all.bin)}`);
