// Temporary folders made by tests: each is named prefprobe-<what>-XXXXXX in the OS temp dir (the suite's own, see
// test/global-setup.ts, which fails the run if anything is left in it) and removed after its test file (test/setup.ts).
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
