// The admin API, with the token. The token is kept in this tab's session storage only
// (gone when the tab closes) and sent in the Authorization header, never in a URL.
// A browser EventSource cannot send that header, so streams are read with fetch().

const TOKEN_KEY = "zdproxy.admin-token";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  forget: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** The admin API refused the token (401): the page asks for it again. */
export class TokenRefused extends Error {}

function headers(secret, extra = {}) {
  return { Authorization: `Bearer ${secret}`, ...extra };
}

/** One call: `{ok, status, body}`; body is the JSON answer (a problem+json on errors). */
export async function call(method, path, body, secret = token.get()) {
  const options = { method, headers: headers(secret), cache: "no-store" };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, options);
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    answer = { detail: `${response.status} ${response.statusText}` };
  }
  if (response.status === 401) throw new TokenRefused(answer.detail);
  return { ok: response.ok, status: response.status, body: answer };
}

/**
 * Read a text/event-stream until it ends or `signal` aborts; `onEvent({event, data, id})`
 * for each event (data parsed as JSON). Resolves when the server ends the stream.
 */
export async function stream(path, onEvent, { signal, lastEventId, secret = token.get() }) {
  const extra = lastEventId ? { "Last-Event-ID": String(lastEventId) } : {};
  const response = await fetch(path, { headers: headers(secret, extra), signal, cache: "no-store" });
  if (response.status === 401) throw new TokenRefused("the admin API refused the token");
  if (!response.ok || !response.body) throw new Error(`${path}: ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const parsed = parseEvent(block);
      if (parsed) onEvent(parsed);
    }
  }
}

/** One SSE block: its `event`, `id` and `data` lines (comments are keep-alives). */
function parseEvent(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { event, id, data: JSON.parse(data.join("\n")) };
}
