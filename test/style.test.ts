// Code shape the team keeps: no function in the engine or the analysis stages over ~60 lines (a stage that grows
// past it is split into named steps), measured on the TypeScript syntax tree.
import * as fs from "node:fs";
import * as path from "node:path";
import ts from "typescript";
import { describe, expect, it } from "vitest";

const MAX_LINES = 65;

/** [name, lines] of every function, method and arrow function with a block body in a source text. */
function functionLengths(file: string, text: string): Array<[string, number]> {
  const src = ts.createSourceFile(file, text, ts.ScriptTarget.ES2022, true);
  const out: Array<[string, number]> = [];
  const lineOf = (pos: number) => src.getLineAndCharacterOfPosition(pos).line;
  const visit = (node: ts.Node): void => {
    if (
      ts.isFunctionDeclaration(node) ||
      ts.isMethodDeclaration(node) ||
      ts.isArrowFunction(node) ||
      ts.isFunctionExpression(node)
    ) {
      if (node.body && ts.isBlock(node.body)) {
        const parent = node.parent;
        const named =
          (node as { name?: ts.Node }).name ??
          (ts.isVariableDeclaration(parent) || ts.isPropertyAssignment(parent) ? parent.name : undefined);
        const name = named?.getText(src) ?? `(anonymous at line ${lineOf(node.getStart(src)) + 1})`;
        out.push([`${file}: ${name}`, lineOf(node.end) - lineOf(node.getStart(src)) + 1]);
      }
    }
    ts.forEachChild(node, visit);
  };
  visit(src);
  return out;
}

describe("code shape", () => {
  it(`no function in src/engine or src/analysis is over ${MAX_LINES} lines`, () => {
    const files = ["src/engine", "src/analysis"].flatMap((d) => fs.readdirSync(d).map((f) => path.join(d, f)));
    const long = files.flatMap((f) => functionLengths(f, fs.readFileSync(f, "utf8"))).filter(([, n]) => n > MAX_LINES);
    expect(long).toEqual([]);
  });

  it("the measure counts a function's lines, nested ones on their own", () => {
    const text = `function outer() {\n  const inner = () => {\n    return 1;\n  };\n  return inner();\n}\n`;
    expect(functionLengths("x.ts", text)).toEqual([
      ["x.ts: outer", 6],
      ["x.ts: inner", 3],
    ]);
  });
});
