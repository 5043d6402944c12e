/**
 * A few DOM helpers shared by the widgets: element creation and a progress bar.
 *
 * Owns: how widgets build nodes. Text from the server (image names, reasons, paths) only
 * ever becomes text nodes, never HTML: a container can choose its own file names.
 */
import { progressFraction, progressText } from './format';

type Child = Node | string | null | undefined | false;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number | boolean | ((ev: any) => void) | undefined> = {},
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) {
      continue;
    }
    if (key.startsWith('on') && typeof value === 'function') {
      node.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === 'className') {
      node.className = String(value);
    } else if (value === true) {
      node.setAttribute(key, '');
    } else {
      node.setAttribute(key, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    node.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

/** A labelled progress bar; indeterminate when the total is unknown. */
export function progressBar(label: string, done: number, total: number | null | undefined,
                            finished = false): HTMLElement {
  const fraction = progressFraction(done, total, finished);
  const bar = h('div', { className: 'jc-progress-fill' });
  if (fraction === null) {
    bar.classList.add('jc-mod-indeterminate');
  } else {
    bar.style.width = `${(fraction * 100).toFixed(1)}%`;
  }
  return h('div', { className: 'jc-progress' },
    h('div', { className: 'jc-progress-label' },
      h('span', { className: 'jc-progress-name' }, label),
      h('span', { className: 'jc-progress-bytes' }, finished ? 'done' : progressText(done, total))),
    h('div', {
      className: 'jc-progress-track', role: 'progressbar',
      'aria-valuemin': 0, 'aria-valuemax': 100,
      'aria-valuenow': fraction === null ? undefined : Math.round(fraction * 100)
    }, bar));
}
