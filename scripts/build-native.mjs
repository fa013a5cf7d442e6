#!/usr/bin/env node
// Builds native/ with node-gyp: prefprobe_blas (the BLAS matmul) when a C compiler and OpenBLAS (or macOS's
// Accelerate) are there, and prefprobe_loop (the event-loop addon the webgpu backend reads tensors back with)
// wherever a C compiler is. Never fails the install: without the matmul prefprobe runs on plain wasm, without
// the loop addon the webgpu backend is not offered; the reasons go to native/build-failed.txt and
// native/loop-failed.txt for the backend line to show. `npm run build:native -- --strict` fails instead.
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const native = path.join(root, "native");
const release = path.join(native, "build", "Release");
const notes = { blas: path.join(native, "build-failed.txt"), loop: path.join(native, "loop-failed.txt") };
const strict = process.argv.includes("--strict");

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

/** Builds every target (the matmul only when `blas`); returns null, or the build's first error line. */
function build(gyp, blas) {
  const dir = nodeDir();
  const args = [gyp, "rebuild", "--loglevel=error", ...(dir ? [`--nodedir=${dir}`] : [])];
  const r = spawnSync(process.execPath, [...args, "--", `-Dprefprobe_blas=${blas ? 1 : 0}`], {
    cwd: native,
    encoding: "utf8",
  });
  if (r.status === 0) return null;
  const out = `${r.stdout}\n${r.stderr}`;
  const line =
    out.split("\n").find((l) => /error/i.test(l) && !/gyp ERR! (stack|System|command|cwd|node|not ok)/.test(l)) ??
    `node-gyp exited with ${r.status}`;
  return `the build failed: ${line.trim().slice(0, 200)}`;
}

/** Runs `code` in a fresh node; returns null, or the error it threw as one line. */
function probe(code) {
  const r = spawnSync(process.execPath, ["-e", code], { encoding: "utf8" });
  if (r.status === 0) return null;
  const line = r.stderr
    .split("\n")
    .reverse()
    .find((l) => /^\w*Error/.test(l));
  return `the built addon does not work: ${(line ?? `exit ${r.status}`).trim().slice(0, 200)}`;
}

// the matmul must load and multiply here, or it is not used: [[1, 2], [3, 4]] · [[5, 6], [7, 8]], B as F32 and as BF16
const blasProbe = `
const a = require(${JSON.stringify(path.join(release, "prefprobe_blas.node"))});
const heap = new Uint8Array(48);
new Float32Array(heap.buffer, 0, 8).set([1, 2, 3, 4, 5, 6, 7, 8]);
const bf16 = new Uint8Array(new Uint16Array([0x40a0, 0x40c0, 0x40e0, 0x4100]).buffer);
for (const [b, off, dtype] of [[heap, 16, 0], [bf16, 0, 1]]) {
  a.matmul(2, 2, 2, heap, Float64Array.of(0), false, b, Float64Array.of(off), false, dtype, heap, Float64Array.of(32), 1);
  const c = Array.from(new Float32Array(heap.buffer, 32, 4)).join(",");
  if (c !== "19,22,43,50") throw new Error("wrong product " + c);
}`;
// the loop addon must run a ready callback from inside a synchronous call, and give stderr back after muting it
const loopProbe = `
const l = require(${JSON.stringify(path.join(release, "prefprobe_loop.node"))});
let ran = false;
setImmediate(() => (ran = true));
for (let i = 0; i < 1000 && !ran; i++) l.runOnce();
if (!ran) throw new Error("runOnce did not run a ready setImmediate callback");
l.restoreStderr(l.muteStderr());`;

const reasons = { blas: null, loop: null };
for (const f of Object.values(notes)) fs.rmSync(f, { force: true });
const gyp = nodeGyp();
if (!gyp) reasons.blas = reasons.loop = "node-gyp was not found";
else {
  if (process.platform !== "darwin") {
    const inc = spawnSync("sh", [path.join(native, "blas-include.sh")], { encoding: "utf8" }).stdout.trim();
    if (!inc || !fs.existsSync(path.join(inc.split(/\s+/)[0], "cblas.h")))
      reasons.blas = "OpenBLAS's cblas.h was not found";
  }
  // both targets in one build; when the matmul's part fails, the loop addon again on its own
  if (!reasons.blas) reasons.blas = build(gyp, true);
  if (reasons.blas) reasons.loop = build(gyp, false);
  if (!reasons.blas) reasons.blas = probe(blasProbe);
  if (!reasons.loop) reasons.loop = probe(loopProbe);
}
if (reasons.blas && reasons.loop) fs.rmSync(path.join(native, "build"), { recursive: true, force: true });
const built = { blas: "native matmul", loop: "event-loop addon for the webgpu backend" };
for (const k of ["blas", "loop"]) {
  const file = path.join(release, `prefprobe_${k}.node`);
  if (reasons[k]) {
    fs.writeFileSync(notes[k], reasons[k] + "\n");
    fs.rmSync(file, { force: true });
    const then = k === "blas" ? "prefprobe runs on plain wasm" : "the webgpu backend is not available";
    console.error(`prefprobe: ${built[k]} not built (${reasons[k]}); ${then}`);
  } else console.error(`prefprobe: ${built[k]} built (${path.relative(root, file)})`);
}
process.exit(strict && (reasons.blas || reasons.loop) ? 1 : 0);
