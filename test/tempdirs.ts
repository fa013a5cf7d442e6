// Temporary folders made by tests: each is named prefprobe-<what>-XXXXXX in the OS temp dir and removed after its
// test file (test/setup.ts); test/global-setup.ts fails the run if the suite leaves more such entries than it found.
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

const made = new Set<string>();

/** A new empty folder in the OS temp dir, removed after the test file that made it. */
export function tempDir(what = "test"): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `prefprobe-${what}-`));
  made.add(dir);
  return dir;
}

/** Removes every folder tempDir made in this process. */
export function removeTempDirs(): void {
  for (const dir of made) fs.rmSync(dir, { recursive: true, force: true });
  made.clear();
}

/** The prefprobe-* entries of the OS temp dir now. */
export const prefprobeTempEntries = (): string[] =>
  fs.readdirSync(os.tmpdir()).filter((n) => n.startsWith("prefprobe-"));
