// Chat templates: a model folder's own Jinja chat_template rendered with @huggingface/jinja as Hugging Face
// transformers' apply_chat_template renders it, and the conversations of a pairs file (HH-RLHF dialogues split into
// turns, a string prompt as one user turn, TRL's lists of messages) cut into prompt text and response texts.
import * as fs from "node:fs";
import * as path from "node:path";
import { Environment, Interpreter, Template } from "@huggingface/jinja";

/** One turn of a conversation, as chat templates read it (fields beyond role and content are passed on as given). */
export interface ChatMessage {
  role: string;
  content: string;
  [field: string]: unknown;
}

/** A preference pair as conversations: the shared prompt turns, then each response's turns. */
export interface ChatPair {
  prompt: ChatMessage[];
  chosen: ChatMessage[];
  rejected: ChatMessage[];
}

/** A model folder's chat template, compiled. Two templates render alike when `source` and `specialTokens` are equal. */
export interface ChatTemplate {
  file: string; // where the template was read from
  source: string;
  specialTokens: Readonly<Record<string, string>>; // bos_token, eos_token, … as the template sees them
  /** The template applied to `messages`; a template's raise_exception, or any failure, throws ChatTemplateError. */
  render(messages: ChatMessage[], addGenerationPrompt: boolean): string;
}

/** A chat template, or a conversation given to one, that cannot be used; one line. */
export class ChatTemplateError extends Error {
  override name = "ChatTemplateError";
}

const firstLine = (e: unknown): string => String(e instanceof Error ? e.message : e).split("\n")[0]!;

/** The special tokens transformers hands a template (its special_tokens_map), as tokenizer_config.json names them. */
const SPECIAL_TOKENS = ["bos_token", "eos_token", "unk_token", "pad_token"] as const;

/** Jinja's range(stop) / range(start, stop, step). */
function range(start: number, stop?: number, step = 1): number[] {
  if (stop === undefined) [start, stop] = [0, start];
  if (step === 0) throw new Error("range() step must not be zero");
  const out: number[] = [];
  for (let i = start; step > 0 ? i < stop : i > stop; i += step) out.push(i);
  return out;
}

/**
 * The variables a template sees: transformers' (messages, add_generation_prompt, the special tokens,
 * raise_exception) and Jinja's constants. Set here rather than by Template.render, whose globals include
 * strftime_now: without it a template that prints today's date (Llama 3.2's) takes its fixed fallback date, so a
 * pair renders to the same text on every day, in every shard and on resume.
 */
function environment(vars: Record<string, unknown>): Environment {
  const env = new Environment();
  const constants = { true: true, false: false, none: null, True: true, False: false, None: null, range };
  for (const [k, v] of Object.entries({ ...constants, ...vars })) env.set(k, v);
  return env;
}

/**
 * Compiles a template source (Template parses with trim_blocks and lstrip_blocks, as transformers' environment
 * does); `specialTokens` are the variables (bos_token, …) it is rendered with.
 */
export function compileChatTemplate(
  source: string,
  specialTokens: Record<string, string> = {},
  file = "chat template",
): ChatTemplate {
  let template: Template;
  try {
    template = new Template(source);
  } catch (e) {
    throw new ChatTemplateError(`${file}: the chat template does not parse (${firstLine(e)})`);
  }
  const raiseException = (message: unknown) => {
    throw new ChatTemplateError(`the chat template refused the conversation: ${firstLine(message)}`);
  };
  const render = (messages: ChatMessage[], addGenerationPrompt: boolean): string => {
    try {
      const vars = { messages, add_generation_prompt: addGenerationPrompt, ...specialTokens };
      const env = environment({ ...vars, raise_exception: raiseException });
      return new Interpreter(env).run(template.parsed).value as string;
    } catch (e) {
      if (e instanceof ChatTemplateError) throw e;
      throw new ChatTemplateError(`the chat template failed on the conversation (${firstLine(e)})`);
    }
  };
  return { file, source, specialTokens: Object.freeze({ ...specialTokens }), render };
}

const readJson = (file: string): Record<string, unknown> => {
  try {
    return JSON.parse(fs.readFileSync(file, "utf8"));
  } catch {
    throw new ChatTemplateError(`${file}: not valid JSON`);
  }
};

/** A token as tokenizer_config.json gives it: a string, or an AddedToken object with its content. */
const tokenText = (v: unknown): string | null => {
  const text = typeof v === "string" ? v : (v as { content?: unknown } | null)?.content;
  return typeof text === "string" ? text : null;
};

/** The template source of tokenizer_config.json's chat_template: a string, or the entry named "default" of a list. */
function configTemplate(value: unknown, file: string): string | null {
  if (value === undefined || value === null) return null;
  if (typeof value === "string") return value;
  if (Array.isArray(value)) {
    const named = value as Array<{ name?: unknown; template?: unknown }>;
    const found = named.find((t) => t?.name === "default")?.template;
    if (typeof found === "string") return found;
    const names = named.map((t) => JSON.stringify(t?.name ?? null)).join(", ");
    throw new ChatTemplateError(`${file}: chat_template lists templates ${names} but none named "default"`);
  }
  throw new ChatTemplateError(`${file}: chat_template must be a string or a list of {name, template}`);
}

/**
 * A model folder's chat template: `chat_template.jinja` when the folder has one (newer transformers save it there),
 * else tokenizer_config.json's `chat_template`; null when there is neither. The special tokens come from
 * tokenizer_config.json.
 */
export function loadChatTemplate(dir: string): ChatTemplate | null {
  const cfgFile = path.join(dir, "tokenizer_config.json");
  const config = fs.existsSync(cfgFile) ? readJson(cfgFile) : {};
  const specialTokens: Record<string, string> = {};
  for (const k of SPECIAL_TOKENS) {
    const t = tokenText(config[k]);
    if (t !== null) specialTokens[k] = t;
  }
  const jinjaFile = path.join(dir, "chat_template.jinja");
  if (fs.existsSync(jinjaFile))
    return compileChatTemplate(fs.readFileSync(jinjaFile, "utf8"), specialTokens, jinjaFile);
  const source = configTemplate(config.chat_template, cfgFile);
  return source === null ? null : compileChatTemplate(source, specialTokens, cfgFile);
}

/** loadChatTemplate, or an error saying the folder has none. */
export function requireChatTemplate(dir: string): ChatTemplate {
  const t = loadChatTemplate(dir);
  if (!t)
    throw new ChatTemplateError(
      `format chat: ${dir} has no chat template (no chat_template in its tokenizer_config.json, no chat_template.jinja)`,
    );
  return t;
}

/**
 * The one chat template both models of a pair read: patching needs the same tokens in both, so templates (or their
 * special tokens) that differ are refused, saying which.
 */
export function sharedChatTemplate(baseDir: string, tunedDir: string): ChatTemplate {
  const [base, tuned] = [requireChatTemplate(baseDir), requireChatTemplate(tunedDir)];
  const what =
    base.source !== tuned.source
      ? "their templates"
      : SPECIAL_TOKENS.filter((k) => base.specialTokens[k] !== tuned.specialTokens[k])
          .map(
            (k) =>
              `${k} ${JSON.stringify(base.specialTokens[k] ?? null)} vs ${JSON.stringify(tuned.specialTokens[k] ?? null)}`,
          )
          .join(", ");
  if (what)
    throw new ChatTemplateError(
      `format chat: the chat templates of ${baseDir} and ${tunedDir} differ (${what}); patching needs both models to read the same tokens`,
    );
  return base;
}

/**
 * The texts a chat pair is scored on: the prompt turns rendered with add_generation_prompt, and for each response
 * what the whole conversation's rendering adds after that prompt text. A template whose prompt rendering is not a
 * prefix of the whole conversation's (one that rewrites earlier turns) cannot be cut so, and is refused.
 */
export function renderChatPair(t: ChatTemplate, pair: ChatPair): { prompt: string; chosen: string; rejected: string } {
  const prompt = t.render(pair.prompt, true);
  const response = (turns: ChatMessage[], which: string): string => {
    const full = t.render([...pair.prompt, ...turns], false);
    if (full.startsWith(prompt)) return full.slice(prompt.length);
    let at = 0;
    while (prompt[at] === full[at]) at++;
    const near = (s: string) => JSON.stringify(s.slice(at, at + 24));
    throw new ChatTemplateError(
      `the chat template's rendering of the prompt turns is not a prefix of its rendering of prompt + ${which} (character ${at}: ${near(prompt)} vs ${near(full)}), so the response cannot be cut from it`,
    );
  };
  return { prompt, chosen: response(pair.chosen, "chosen"), rejected: response(pair.rejected, "rejected") };
}

/** HH-RLHF's turn markers; the ": " after a role is a separator, not content. */
const HH_MARK = /(?:^|\n\n)(Human|Assistant): ?/g;

/** The turns of an HH-RLHF dialogue ("\n\nHuman: …\n\nAssistant: …"): Human → user, Assistant → assistant. */
export function hhMessages(dialogue: string): ChatMessage[] {
  const marks = [...dialogue.matchAll(HH_MARK)];
  if (marks.length === 0 || dialogue.slice(0, marks[0]!.index).trim() !== "")
    throw new ChatTemplateError(`not an HH-RLHF dialogue: it does not begin with a "\\n\\nHuman:" turn`);
  return marks.map((m, i) => ({
    role: m[1] === "Human" ? "user" : "assistant",
    content: dialogue.slice(m.index + m[0].length, marks[i + 1]?.index ?? dialogue.length),
  }));
}

const same = (a: ChatMessage[], b: ChatMessage[]) => JSON.stringify(a) === JSON.stringify(b);

/** An HH-RLHF pair of whole dialogues: the turns before the final Assistant turn are the prompt, shared by both. */
function hhPair(chosen: string, rejected: string): ChatPair {
  const [c, r] = [hhMessages(chosen), hhMessages(rejected)];
  if (c.at(-1)!.role !== "assistant" || r.at(-1)!.role !== "assistant")
    throw new ChatTemplateError(`an HH-RLHF dialogue does not end with an Assistant turn`);
  if (!same(c.slice(0, -1), r.slice(0, -1)))
    throw new ChatTemplateError(`the chosen and rejected dialogues differ before their final Assistant turn`);
  return { prompt: c.slice(0, -1), chosen: c.slice(-1), rejected: r.slice(-1) };
}

/** A list of {role, content} messages (TRL's conversational format), checked. */
function messagesOf(value: unknown, key: string): ChatMessage[] {
  if (!Array.isArray(value)) throw new ChatTemplateError(`"${key}" must be a list of {role, content} messages`);
  return value.map((m: unknown, i) => {
    const o = m as Record<string, unknown> | null;
    if (o === null || typeof o !== "object" || typeof o.role !== "string" || typeof o.content !== "string")
      throw new ChatTemplateError(`${key}[${i}] must be a message {"role": string, "content": string}`);
    return { ...o } as ChatMessage;
  });
}

/** TRL's conversational pair: message lists, with the prompt given or (left out) the messages both share first. */
function listPair(r: Record<string, unknown>): ChatPair {
  const [chosen, rejected] = [messagesOf(r.chosen, "chosen"), messagesOf(r.rejected, "rejected")];
  if ("prompt" in r) {
    const prompt =
      typeof r.prompt === "string" ? [{ role: "user", content: r.prompt }] : messagesOf(r.prompt, "prompt");
    return { prompt, chosen, rejected };
  }
  let k = 0;
  while (k < chosen.length && k < rejected.length && same([chosen[k]!], [rejected[k]!])) k++;
  return { prompt: chosen.slice(0, k), chosen: chosen.slice(k), rejected: rejected.slice(k) };
}

/**
 * The conversation of one pairs-file record: TRL's message lists as they are; {prompt, chosen, rejected} strings as
 * one user turn and one assistant turn each; HH-RLHF {chosen, rejected} dialogues split into turns.
 */
export function conversationOf(r: Record<string, unknown>): ChatPair {
  let pair: ChatPair;
  if (Array.isArray(r.chosen) || Array.isArray(r.rejected)) pair = listPair(r);
  else if (typeof r.chosen !== "string" || typeof r.rejected !== "string")
    throw new ChatTemplateError(`needs "chosen" and "rejected": strings, or lists of {role, content} messages`);
  else if (!("prompt" in r)) pair = hhPair(r.chosen, r.rejected);
  else if (typeof r.prompt !== "string") throw new ChatTemplateError(`"prompt" must be a string`);
  else {
    const reply = (content: string) => [{ role: "assistant", content }];
    pair = { prompt: [{ role: "user", content: r.prompt }], chosen: reply(r.chosen), rejected: reply(r.rejected) };
  }
  if (pair.prompt.length === 0) throw new ChatTemplateError(`the conversation has no prompt turns`);
  if (pair.chosen.length === 0 || pair.rejected.length === 0)
    throw new ChatTemplateError(`a response has no turns after the prompt`);
  return pair;
}
