// Loading memory bench: peak resident memory while reading a large safetensors folder, as a ratio of the
// decoded (float32) size it must end up holding. Target: ≤ 1.25x — the file is read tensor by tensor, never
// whole, so a 2.5 GB BF16 file needs its 5 GB float32 result plus one tensor, not file + result.
// The read runs in a fresh child process so that the writer's freed memory does not hide it.
// Run: npx tsx bench/load-memory.ts [MiB]
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { iterSafetensorsFolder, writeSafetensors, type DType } from "../src/io/safetensors.js";

const PER = 4 * 2 ** 20; // values per tensor

if (process.argv[2] === "--read") {
  const base = process.memoryUsage().rss;
  let peak = base;
  const kept: Float32Array[] = [];
  for (const [, t] of iterSafetensorsFolder(process.argv[3]!)) {
    kept.push(t.data as Float32Array); // keep every decoded tensor, as a model load does
    peak = Math.max(peak, process.memoryUsage().rss);
  }
  console.log(JSON.stringify({ growth: peak - base, decoded: kept.length * PER * 4 }));
} else {
  const mib = Number(process.argv[2] ?? 256);
  for (const dtype of ["F32", "BF16"] as DType[]) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "prefprobe-bench-"));
    const n = Math.max(1, Math.round((mib * 2 ** 20) / (PER * (dtype === "F32" ? 4 : 2))));
    const data = Float32Array.from({ length: PER }, (_, i) => Math.sin(i));
    for (let i = 0; i < n; i++)
      writeSafetensors(path.join(dir, `s${i}.safetensors`), { [`t${i}`]: { dtype, shape: [PER], data } });
    const weightMap = Object.fromEntries(Array.from({ length: n }, (_, i) => [`t${i}`, `s${i}.safetensors`]));
    fs.writeFileSync(path.join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map: weightMap }));
    const size = fs.readdirSync(dir).reduce((a, f) => a + fs.statSync(path.join(dir, f)).size, 0);
    const out = execFileSync(process.execPath, ["--import", "tsx", import.meta.filename, "--read", dir], {
      encoding: "utf8",
    });
    const { growth, decoded } = JSON.parse(out) as { growth: number; decoded: number };
    const M = (b: number) => `${(b / 2 ** 20).toFixed(0)} MiB`;
    console.log(
      `${dtype}: files ${M(size)}, decoded ${M(decoded)}, peak RSS growth ${M(growth)} = ${(growth / decoded).toFixed(2)}x the decoded size (target ≤ 1.25x), ${(growth / size).toFixed(2)}x the files`,
    );
    fs.rmSync(dir, { recursive: true });
  }
}
