/**
 * The notebook toolbar's "Snapshot" button: turns the kernel container's writable layer into
 * a new image (POST kernels/{id}/container/commit).
 *
 * A first dialog shows the diff summary by folder and asks for the tag (validated as it is
 * typed), a message, the compression and whether to install the result as a kernel; a second
 * shows the operation's progress and then the result (name, digest, kernel).
 *
 * Owns: the button (shown for contained kernels only) and both dialogs. Must not: decide the
 * tag's validity for the server (it validates again; this check only helps while typing).
 */
import { Dialog, ToolbarButton } from '@jupyterlab/apputils';
import { DocumentRegistry } from '@jupyterlab/docregistry';
import { INotebookModel, NotebookPanel } from '@jupyterlab/notebook';
import { IDisposable } from '@lumino/disposable';
import { Widget } from '@lumino/widgets';

import { Diff, Operation, followOperation, kernelDiff, startCommit, startPush } from './api';
import { h, progressBar } from './dom';
import { diffCounts, diffRows, formatBytes, shortDigest, validateTag } from './format';
import { containerOf, kernelIdOf } from './kernels';
import { snapshotIcon } from './icons';

export interface SnapshotRequest {
  tag: string;
  message?: string;
  compress: string;
  install_kernelspec: boolean;
  display_name?: string;
}

/** The first dialog's body: the diff and the form. */
export class SnapshotForm extends Widget implements Dialog.IBodyWidget<SnapshotRequest | null> {
  constructor(diff: Diff | null, diffError: string | null, defaultTag: string) {
    super();
    this.addClass('jc-snapshot-form');
    const rows = diff ? diffRows(diff.summary) : [];
    const diffNode = diff
      ? h('div', { className: 'jc-diff' },
          h('div', { className: 'jc-diff-total' },
            `${diff.total} change${diff.total === 1 ? '' : 's'}, ${formatBytes(diff.bytes)}` +
            (diff.truncated ? ' (list truncated)' : '')),
          rows.length
            ? h('table', { className: 'jc-diff-table' },
                h('thead', {}, h('tr', {}, h('th', {}, 'Folder'), h('th', {}, 'Files'), h('th', {}, 'Size'))),
                h('tbody', {}, rows.map(r => h('tr', {},
                  h('td', { className: 'jc-diff-path' }, r.path),
                  h('td', { title: 'added ~changed -deleted' }, diffCounts(r)),
                  h('td', {}, formatBytes(r.bytes))))))
            : h('p', {}, 'Nothing changed since the image: the snapshot would equal it.'))
      : h('p', { className: 'jc-error' }, `Could not read the container's changes: ${diffError}`);
    this.tag.value = defaultTag;
    this.displayName.placeholder = 'default: Contained Python (<name>)';
    this.tag.addEventListener('input', () => this.validate());
    this.install.addEventListener('change', () => {
      this.displayName.disabled = !this.install.checked;
    });
    this.node.append(
      diffNode,
      h('label', { className: 'jc-field' }, h('span', {}, 'Tag'), this.tag),
      this.tagError,
      h('label', { className: 'jc-field' }, h('span', {}, 'Message'), this.message),
      h('label', { className: 'jc-field' }, h('span', {}, 'Compression'), this.compress),
      h('label', { className: 'jc-field jc-check' }, this.install, h('span', {}, 'Install as a kernel')),
      h('label', { className: 'jc-field' }, h('span', {}, 'Kernel name'), this.displayName));
  }

  protected onAfterAttach(): void {
    this.validate();
    this.tag.focus();
    this.tag.select();
  }

  /** Checks the tag; disables the dialog's Snapshot button while it is invalid. */
  validate(): boolean {
    const error = validateTag(this.tag.value);
    this.tagError.textContent = error ?? '';
    this.tag.classList.toggle('jc-mod-invalid', error !== null);
    this.tag.setAttribute('aria-invalid', error ? 'true' : 'false');
    const accept = this.node.closest('.jp-Dialog')?.querySelector<HTMLButtonElement>('.jp-mod-accept');
    if (accept) {
      accept.disabled = error !== null;
    }
    return error === null;
  }

  getValue(): SnapshotRequest | null {
    if (!this.validate()) {
      return null;
    }
    return {
      tag: this.tag.value,
      // the API refuses an empty message: leave it out
      message: this.message.value.trim() || undefined,
      compress: this.compress.value,
      install_kernelspec: this.install.checked,
      display_name: this.install.checked && this.displayName.value.trim() ? this.displayName.value.trim() : undefined
    };
  }

  private readonly tag = h('input', { className: 'jp-mod-styled jc-snapshot-tag', type: 'text', spellcheck: 'false', 'aria-label': 'Tag' });
  private readonly tagError = h('div', { className: 'jc-field-error jc-snapshot-tag-error', 'aria-live': 'polite' });
  private readonly message = h('input', { className: 'jp-mod-styled jc-snapshot-message', type: 'text', placeholder: 'what changed (optional)' });
  private readonly compress = h('select', { className: 'jp-mod-styled jc-snapshot-compress' },
    h('option', { value: 'gzip' }, 'gzip (any registry, Docker)'),
    h('option', { value: 'zstd' }, 'zstd (faster, newer tools)'));
  private readonly install = h('input', { type: 'checkbox', className: 'jc-snapshot-install', checked: true });
  private readonly displayName = h('input', { className: 'jp-mod-styled jc-snapshot-display', type: 'text' });
}

/** A tag to start from: the kernel's image repository with a time-stamped tag. */
export function defaultTag(image: string | undefined): string {
  const now = new Date();
  const pad = (v: number) => v.toString().padStart(2, '0');
  const stamp = `${now.getFullYear()}${pad(now.getMonth() + 1)}${pad(now.getDate())}-${pad(now.getHours())}${pad(now.getMinutes())}`;
  let repo = (image ?? 'snapshot').split('@')[0];
  const slash = repo.lastIndexOf('/');
  const colon = repo.lastIndexOf(':');
  if (colon > slash) {
    repo = repo.slice(0, colon);
  }
  repo = repo.slice(repo.lastIndexOf('/') + 1) || 'snapshot';
  return `${repo}-snapshot:${stamp}`;
}

/** Runs the whole flow for a notebook. */
export async function snapshotNotebook(panel: NotebookPanel, app: { openKernel: (name: string) => void; kernelspecsChanged: () => void }): Promise<void> {
  const kernelId = kernelIdOf(panel.sessionContext);
  if (!kernelId) {
    return;
  }
  const info = await containerOf(kernelId);
  if (!info.contained) {
    return;
  }
  let diff: Diff | null = null;
  let diffError: string | null = null;
  try {
    diff = await kernelDiff(kernelId);
  } catch (error) {
    diffError = (error as Error).message;
  }
  const form = new SnapshotForm(diff, diffError, defaultTag(info.image?.name));
  const result = await new Dialog<SnapshotRequest | null>({
    title: 'Snapshot the kernel container',
    body: form,
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Snapshot' })],
    focusNodeSelector: '.jc-snapshot-tag'
  }).launch();
  if (!result.button.accept || !result.value) {
    return;
  }
  const request = result.value;
  const status = h('div', { className: 'jc-snapshot-progress' });
  const dialog = new Dialog({
    title: `Snapshot ${request.tag}`,
    body: new Widget({ node: status }),
    buttons: [Dialog.okButton({ label: 'Close' })]
  });
  void dialog.launch();
  const show = (op: Operation) => {
    const p = op.progress;
    status.replaceChildren(
      h('p', { className: 'jc-stage' }, p.stage || op.state),
      progressBar(op.state === 'succeeded' ? 'written' : 'layer', p.done, p.total, op.state === 'succeeded'));
  };
  try {
    const op = await startCommit(kernelId, request);
    const final = await followOperation(op, show);
    if (final.state !== 'succeeded') {
      status.replaceChildren(h('p', { className: 'jc-error' },
        `Snapshot ${final.state}: ${final.error?.message ?? 'no reason given'}`));
      return;
    }
    const image = final.result?.image;
    const installed = final.result?.kernelspec;
    const spec = typeof installed === 'string' ? { name: installed, display_name: request.display_name } : installed;
    if (spec) {
      app.kernelspecsChanged();
    }
    const children: (Node | null)[] = [
      h('p', { className: 'jc-result' }, 'Snapshot ', h('b', { className: 'jc-result-name' }, image?.familiar ?? image?.name ?? request.tag)),
      h('p', { className: 'jc-result-digest', title: image?.digest ?? '' }, `digest ${image?.digest ?? '?'}`),
      image ? h('p', {}, `size ${formatBytes(image.size)} (${shortDigest(image.id)})`) : null,
      spec
        ? h('p', { className: 'jc-result-kernel' }, `Kernel ${spec.display_name ? `"${spec.display_name}" (${spec.name})` : spec.name} installed. `,
            h('button', {
              className: 'jp-mod-styled jp-mod-accept jc-open-kernel',
              onclick: () => { dialog.resolve(0); app.openKernel(spec.name); }
            }, 'New notebook with it'))
        : null,
      image ? pushRow(image.name) : null];
    status.replaceChildren(...children.filter((c): c is Node => c !== null));
  } catch (error) {
    status.replaceChildren(h('p', { className: 'jc-error' }, `Snapshot failed: ${(error as Error).message}`));
  }
}

/** "Push to": a reference (checked while typed), then the push's progress and result in place. */
function pushRow(image: string): HTMLElement {
  const input = h('input', { className: 'jp-mod-styled jc-push-target', type: 'text', spellcheck: 'false',
    placeholder: 'registry/name:tag', 'aria-label': 'Push to' });
  const button = h('button', { className: 'jp-mod-styled jp-mod-accept jc-push-button', disabled: true }, 'Push');
  const error = h('div', { className: 'jc-field-error' });
  const progress = h('div', { className: 'jc-push-progress' });
  input.addEventListener('input', () => {
    const why = input.value ? validateTag(input.value) : null;
    error.textContent = why ?? '';
    button.disabled = !input.value || why !== null;
  });
  button.addEventListener('click', async () => {
    const target = input.value;
    button.disabled = true;
    input.disabled = true;
    try {
      const final = await followOperation(await startPush(image, target), op => {
        progress.replaceChildren(progressBar(op.progress.stage || 'push', op.progress.done, op.progress.total,
          op.state === 'succeeded'));
      });
      progress.replaceChildren(final.state === 'succeeded'
        ? h('p', { className: 'jc-push-done' }, `Pushed to ${target}`)
        : h('p', { className: 'jc-error' }, `Push ${final.state}: ${final.error?.message ?? 'no reason given'}`));
    } catch (err) {
      progress.replaceChildren(h('p', { className: 'jc-error' }, `Push failed: ${(err as Error).message}`));
    } finally {
      input.disabled = false;
      button.disabled = false;
    }
  });
  return h('div', { className: 'jc-push' },
    h('label', { className: 'jc-field' }, h('span', {}, 'Push to'), input, button), error, progress);
}

/** Adds the button to every notebook's toolbar; it shows only while the kernel is contained. */
export class SnapshotButtonExtension implements DocumentRegistry.IWidgetExtension<NotebookPanel, INotebookModel> {
  constructor(private readonly app: { openKernel: (name: string) => void; kernelspecsChanged: () => void }) {}

  createNew(panel: NotebookPanel): IDisposable {
    const button = new ToolbarButton({
      className: 'jc-snapshot-button',
      icon: snapshotIcon,
      label: 'Snapshot',
      tooltip: 'Snapshot: make an image of this kernel container (installed packages and files)',
      onClick: () => void snapshotNotebook(panel, this.app).catch(error => console.error(error))
    });
    button.hide();
    const update = () => {
      const kernelId = kernelIdOf(panel.sessionContext);
      if (!kernelId) {
        button.hide();
        return;
      }
      containerOf(kernelId).then(answer => {
        if (kernelIdOf(panel.sessionContext) === kernelId) {
          answer.contained ? button.show() : button.hide();
        }
      }, () => button.hide());
    };
    panel.sessionContext.kernelChanged.connect(update);
    panel.sessionContext.statusChanged.connect(update);
    if (!panel.toolbar.insertBefore('spacer', 'jupyter-contain-snapshot', button)) {
      panel.toolbar.insertItem(10, 'jupyter-contain-snapshot', button);
    }
    update();
    return button;
  }
}
