#!/usr/bin/env node
// Builds native/ (the BLAS matmul) with node-gyp when a C compiler and OpenBLAS (or macOS's Accelerate) are
// there. Never fails the install: without them prefprobe runs on plain wasm, and this writes the reason to
// native/build-failed.txt for the backend line to show. `npm run build:native -- --strict` fails instead.
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const native = path.join(root, "native");
const note = path.join(native, "build-failed.txt");
const strict = process.argv.includes("--strict");

function fail(reason) {
  fs.writeFileSync(note, reason + "\n");
  fs.rmSync(path.join(native, "build"), { recursive: true, force: true });
  console.error(`prefprobe: native matmul not built (${reason}); prefprobe runs on plain wasm`);
  process.exit(strict ? 1 : 0);
}

/** node-gyp: the one npm runs scripts with, else npm's own copy. */
function nodeGyp() {
  if (process.env.npm_config_node_gyp && fs.existsSync(process.env.npm_config_node_gyp))
    return process.env.npm_config_node_gyp;
  for (const from of [
    process.execPath,
    path.join(path.dirname(process.execPath), "..", "lib", "node_modules", "npm", "index.js"),
  ]) {
    try {
      return createRequire(from).resolve("node-gyp/bin/node-gyp.js");
    } catch {}
  }
  const npmGyp = path.join(
    path.dirname(process.execPath),
    "..",
    "lib",
    "node_modules",
    "npm",
    "node_modules",
    "node-gyp",
    "bin",
    "node-gyp.js",
  );
  return fs.existsSync(npmGyp) ? npmGyp : null;
}

/** Node's own headers (node_api.h), so node-gyp needs no download. */
function nodeDir() {
  for (const dir of [process.env.npm_config_nodedir, path.resolve(path.dirname(process.execPath), "..")]) {
    if (dir && fs.existsSync(path.join(dir, "include", "node", "node_api.h"))) return dir;
  }
  return null;
}

fs.rmSync(note, { force: true });
if (process.platform !== "darwin") {
  const inc = spawnSync("sh", [path.join(native, "blas-include.sh")], { encoding: "utf8" }).stdout.trim();
  if (!inc || !fs.existsSync(path.join(inc.split(/\s+/)[0], "cblas.h"))) fail("OpenBLAS's cblas.h was not found");
}
const gyp = nodeGyp();
if (!gyp) fail("node-gyp was not found");
const dir = nodeDir();
const args = [gyp, "rebuild", "--loglevel=error", ...(dir ? [`--nodedir=${dir}`] : [])];
const r = spawnSync(process.execPath, args, { cwd: native, encoding: "utf8" });
if (r.status !== 0) {
  const out = `${r.stdout}\n${r.stderr}`;
  const line =
    out.split("\n").find((l) => /error/i.test(l) && !/gyp ERR! (stack|System|command|cwd|node|not ok)/.test(l)) ??
    `node-gyp exited with ${r.status}`;
  fail(`the build failed: ${line.trim().slice(0, 200)}`);
}
// the build must load and multiply here, or it is not used: [[1, 2], [3, 4]] · [[5, 6], [7, 8]], B as F32 and as BF16
const probe = `
const a = require(${JSON.stringify(path.join(native, "build", "Release", "prefprobe_blas.node"))});
const heap = new Uint8Array(48);
new Float32Array(heap.buffer, 0, 8).set([1, 2, 3, 4, 5, 6, 7, 8]);
const bf16 = new Uint8Array(new Uint16Array([0x40a0, 0x40c0, 0x40e0, 0x4100]).buffer);
for (const [b, off, dtype] of [[heap, 16, 0], [bf16, 0, 1]]) {
  a.matmul(2, 2, 2, heap, Float64Array.of(0), false, b, Float64Array.of(off), false, dtype, heap, Float64Array.of(32), 1);
  const c = Array.from(new Float32Array(heap.buffer, 32, 4)).join(",");
  if (c !== "19,22,43,50") throw new Error("wrong product " + c);
}`;
const check = spawnSync(process.execPath, ["-e", probe], { encoding: "utf8" });
if (check.status !== 0)
  fail(
    `the built addon does not work: ${(
      check.stderr
        .split("\n")
        .reverse()
        .find((l) => /^\w*Error/.test(l)) ?? ""
    )
      .trim()
      .slice(0, 200)}`,
  );
console.error("prefprobe: native matmul built (native/build/Release/prefprobe_blas.node)");
