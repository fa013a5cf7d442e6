// Runs in every test file's process before its tests: removes the file's temporary folders when it ends.
import { afterAll } from "vitest";
import { removeTempDirs } from "./tempdirs.js";

afterAll(removeTempDirs);
