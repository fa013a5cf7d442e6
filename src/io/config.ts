// Reads a model folder's config.json (the parsing and validation live in model/config.ts).
import * as fs from "node:fs";
import * as path from "node:path";
import { ConfigError, parseConfig, type LlamaConfig } from "../model/config.js";

/** Reads and validates `<dir>/config.json`. */
export function loadConfig(dir: string): LlamaConfig {
  const file = path.join(dir, "config.json");
  if (!fs.existsSync(file)) throw new ConfigError(`${dir}: no config.json (is this a Hugging Face model folder?)`);
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch {
    throw new ConfigError(`${file}: not valid JSON`);
  }
  return parseConfig(raw, file);
}
