// The report's token maps stay legible at any pair length: a bounded number of labels, never two overlapping,
// and the prompt/response boundary always labelled.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { labelledColumns } from "../src/io/report.js";

describe("token map labels", () => {
  it("label at most one column per 14 px, always the boundary, and no two labels closer than n/2 columns", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 2000 }), fc.integer({ min: 100, max: 1100 }), fc.nat(), (n, width, b) => {
        const cols = Array.from({ length: n }, (_, i) => i);
        const boundary = b % n;
        const { every, shown } = labelledColumns(cols, width, boundary);
        const room = Math.floor(width / 14);
        expect(shown.length).toBeLessThanOrEqual(room + 1);
        expect(shown).toContain(boundary);
        if (n <= room) expect(shown).toEqual(cols); // short pairs: every token labelled
        for (let i = 1; i < shown.length; i++) expect(shown[i]! - shown[i - 1]!).toBeGreaterThanOrEqual(every / 2);
      }),
      { numRuns: 300, seed: 20261204 },
    );
  });

  it("a 500-token pair on a 960 px map is labelled every 8th token", () => {
    const cols = Array.from({ length: 500 }, (_, i) => `${i}`);
    const { every, shown } = labelledColumns(cols, 960, "37");
    expect(every).toBe(8);
    expect(shown.slice(0, 7)).toEqual(["0", "8", "16", "24", "32", "37", "48"]); // 40 is 3 < 8/2 from 37
  });
});
