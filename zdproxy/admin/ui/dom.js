// Building the page's elements. Everything that comes from the API goes in as text
// (textContent, attribute values), never as HTML: an event reason or a version label
// that holds markup shows as the characters it is.

/** An element: `el("td", {class: "num"}, "12", child)`. Strings become text nodes. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace a node's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function byId(id) {
  return document.getElementById(id);
}

/** A table: headers, then rows of cells (text or nodes). */
export function table(caption, headers, rows, attributes = {}) {
  return el(
    "table",
    attributes,
    caption ? el("caption", {}, caption) : null,
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))),
  );
}

// -- numbers as the CLI prints them -------------------------------------------------------

export function percent(value, digits = 1) {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(digits)}%`;
}

export function ratio(value, digits = 2) {
  return value === null || value === undefined ? "–" : percent(value * 100, digits);
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? `${value.toFixed(2)} ms` : `${value.toFixed(0)} ms`;
}

export function rate(value) {
  return value === null || value === undefined ? "–" : `${value.toFixed(1)}/s`;
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 60) return `${Number(value.toFixed(1))}s`;
  const minutes = Math.floor(value / 60);
  return `${minutes}m${String(Math.round(value - minutes * 60)).padStart(2, "0")}s`;
}

/** Epoch seconds as local time of day, HH:MM:SS. */
export function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}
