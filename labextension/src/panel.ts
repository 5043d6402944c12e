/**
 * The "Containers" sidebar panel: images (pull with a bar per layer, remove, install as a
 * kernel), the running kernel containers (stats, stop) and the long operations in progress.
 *
 * Owns: the panel's refresh loop (only while the panel is visible: every 3 s, every 0.7 s
 * while an operation runs). Must not: keep its own idea of the store (it shows what the
 * server says at each refresh) or render server text as HTML.
 */
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  Container, Image, Operation, Stats, cancelOperation, containerStats, installKernelspec, listContainers,
  listImages, listOperations, removeImage, startPull, stopContainer
} from './api';
import { h, progressBar } from './dom';
import { formatBytes, formatCpus, formatTime, limitLevel, meterParts, shortDigest, validateTag } from './format';
import { containerIcon } from './icons';

const IDLE_MS = 3000;
const BUSY_MS = 700;
/** Finished operations stay listed this long, so a quick pull still shows its full bar. */
const RECENT_S = 120;

export class ContainersPanel extends Widget {
  constructor(private readonly hooks: { kernelspecsChanged: () => void; openKernel: (name: string) => void }) {
    super();
    this.id = 'jupyter-contain-panel';
    this.addClass('jc-panel');
    this.title.icon = containerIcon;
    this.title.caption = 'Containers';
    this.pullInput.addEventListener('keydown', (ev: KeyboardEvent) => {
      if (ev.key === 'Enter') {
        void this.pull();
      }
    });
    this.pullInput.addEventListener('input', () => {
      // a pull takes a reference with an optional digest: check the name part only
      const value = this.pullInput.value.split('@')[0];
      const error = this.pullInput.value ? validateTag(value) : null;
      this.pullError.textContent = error ?? '';
      this.pullButton.disabled = !this.pullInput.value || error !== null;
    });
    this.pullButton.disabled = true;
    this.node.append(
      h('header', { className: 'jc-panel-header' },
        h('h2', {}, 'Containers'),
        h('button', { className: 'jp-mod-styled jc-refresh', title: 'Refresh', onclick: () => void this.refresh() }, 'Refresh')),
      this.errorNode,
      h('section', { className: 'jc-section jc-images-section' },
        h('h3', {}, 'Images'),
        h('div', { className: 'jc-pull' }, this.pullInput, this.pullButton),
        this.pullError,
        this.imagesNode),
      h('section', { className: 'jc-section jc-ops-section' }, h('h3', {}, 'Operations'), this.opsNode),
      h('section', { className: 'jc-section jc-containers-section' }, h('h3', {}, 'Kernel containers'), this.containersNode));
  }

  protected onAfterShow(msg: Message): void {
    void this.refresh();
  }

  protected onAfterHide(msg: Message): void {
    this.schedule(null);
  }

  protected onBeforeDetach(msg: Message): void {
    this.schedule(null);
  }

  /** Reads everything again and redraws. */
  async refresh(): Promise<void> {
    if (this.refreshing) {
      return;
    }
    this.refreshing = true;
    let busy = false;
    try {
      const [images, containers, operations] = await Promise.all([listImages(), listContainers(), listOperations()]);
      const running = containers.filter(c => c.status === 'running');
      const stats = await Promise.all(running.map(c => containerStats(c.id).catch(() => null)));
      this.errorNode.textContent = '';
      this.renderImages(images);
      busy = this.renderOperations(operations);
      this.renderContainers(containers, new Map(running.map((c, i) => [c.id, stats[i]])));
    } catch (error) {
      this.errorNode.textContent = `Cannot reach the jupyter-contain server extension: ${(error as Error).message}`;
    } finally {
      this.refreshing = false;
    }
    if (this.isVisible) {
      this.schedule(busy ? BUSY_MS : IDLE_MS);
    }
  }

  private schedule(ms: number | null): void {
    if (this.timer !== null) {
      window.clearTimeout(this.timer);
      this.timer = null;
    }
    if (ms !== null && !this.isDisposed) {
      this.timer = window.setTimeout(() => void this.refresh(), ms);
    }
  }

  private async pull(): Promise<void> {
    const reference = this.pullInput.value.trim();
    if (!reference || this.pullButton.disabled) {
      return;
    }
    this.pullButton.disabled = true;
    try {
      await startPull(reference);
      this.pullInput.value = '';
    } catch (error) {
      void showErrorMessage(`Cannot pull ${reference}`, (error as Error).message);
    } finally {
      this.pullButton.disabled = !this.pullInput.value;
    }
    void this.refresh();
  }

  private renderImages(images: Image[]): void {
    if (!images.length) {
      this.imagesNode.replaceChildren(h('p', { className: 'jc-empty' }, 'No images in the store. Pull one above.'));
      return;
    }
    const sorted = [...images].sort((a, b) => (a.familiar || a.name).localeCompare(b.familiar || b.name));
    this.imagesNode.replaceChildren(h('ul', { className: 'jc-list jc-images' }, sorted.map(image =>
      h('li', { className: 'jc-item jc-image', 'data-name': image.name },
        h('div', { className: 'jc-item-main' },
          h('span', { className: 'jc-item-name', title: image.name }, image.familiar || image.name),
          h('span', { className: 'jc-item-meta' },
            [formatBytes(image.size), formatTime(image.created), shortDigest(image.digest)].filter(Boolean).join(' · '))),
        h('div', { className: 'jc-item-actions' },
          h('button', { className: 'jp-mod-styled jc-install', title: 'Install as a kernel', onclick: () => void this.install(image) }, 'Kernel'),
          h('button', { className: 'jp-mod-styled jc-remove', title: 'Remove from the store', onclick: () => void this.remove(image) }, 'Remove'))))));
  }

  /** Returns whether an operation is still running. */
  private renderOperations(operations: Operation[]): boolean {
    const now = Date.now() / 1000;
    const shown = operations
      .filter(op => op.state === 'running' || (op.finished !== null && now - op.finished < RECENT_S))
      .sort((a, b) => b.created - a.created);
    if (!shown.length) {
      this.opsNode.replaceChildren(h('p', { className: 'jc-empty' }, 'None in progress.'));
      return false;
    }
    this.opsNode.replaceChildren(h('ul', { className: 'jc-list jc-ops' }, shown.map(op => {
      const p = op.progress;
      const done = op.state === 'succeeded';
      return h('li', { className: `jc-item jc-op jc-op-${op.state}`, 'data-id': op.id, 'data-kind': op.kind },
        h('div', { className: 'jc-op-head' },
          h('div', { className: 'jc-item-main' },
            h('span', { className: 'jc-item-name', title: op.target }, `${op.kind} ${op.target}`),
            h('span', { className: 'jc-item-meta' }, op.state === 'running' ? p.stage : op.state)),
          op.state === 'running'
            ? h('button', { className: 'jp-mod-styled jc-cancel', onclick: () => void cancelOperation(op.id).then(() => this.refresh()) }, 'Cancel')
            : null),
        op.error ? h('div', { className: 'jc-error' }, op.error.message) : null,
        progressBar('total', p.done, p.total, done),
        h('div', { className: 'jc-op-items' }, (p.items ?? []).map(item =>
          progressBar(shortDigest(item.id) || item.id, item.done, item.total, item.state === 'done' || done))));
    })));
    return shown.some(op => op.state === 'running');
  }

  private renderContainers(containers: Container[], stats: Map<string, Stats | null>): void {
    if (!containers.length) {
      this.containersNode.replaceChildren(h('p', { className: 'jc-empty' }, 'No kernel containers.'));
      return;
    }
    this.containersNode.replaceChildren(h('ul', { className: 'jc-list jc-containers' }, containers.map(c => {
      const s = stats.get(c.id) ?? null;
      const parts = s ? meterParts(s, s.cpu.percent) : null;
      const limits = [c.limits.memory ? formatBytes(c.limits.memory) : null, c.limits.cpus ? formatCpus(c.limits.cpus) : null,
        c.limits.pids ? `${c.limits.pids} procs` : null, `network ${c.network}`].filter(Boolean).join(', ');
      return h('li', { className: 'jc-item jc-container', 'data-id': c.id, 'data-level': parts?.level ?? 'ok' },
        h('div', { className: 'jc-item-main' },
          h('span', { className: 'jc-item-name', title: c.id }, c.notebook_path || c.kernel_name || c.name),
          h('span', { className: 'jc-item-meta' }, `${c.image} · ${c.status}${c.reason ? ` (${c.reason})` : ''}`),
          h('span', { className: 'jc-item-meta' }, `limits: ${limits}`),
          parts ? h('span', { className: 'jc-item-stats', 'data-level': parts.level, title: parts.title },
            `${parts.memory.text} · ${parts.cpu.text} · ${parts.pids.text}`) : null,
          s && s.memory.limit ? h('div', { className: 'jc-mini-track', 'data-level': limitLevel(s.memory.current, s.memory.limit) },
            h('div', { className: 'jc-mini-fill', style: `width: ${Math.min(100, (100 * s.memory.current) / s.memory.limit).toFixed(1)}%` })) : null),
        h('div', { className: 'jc-item-actions' },
          c.status === 'running'
            ? h('button', { className: 'jp-mod-styled jc-stop', onclick: () => void this.stop(c) }, 'Stop')
            : null));
    })));
  }

  private async remove(image: Image): Promise<void> {
    const answer = await showDialog({
      title: 'Remove image',
      body: `Remove ${image.familiar || image.name} (${formatBytes(image.size)}) from the image store?`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Remove' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await removeImage(image.name);
    } catch (error) {
      void showErrorMessage(`Cannot remove ${image.familiar}`, (error as Error).message);
    }
    void this.refresh();
  }

  private async stop(c: Container): Promise<void> {
    const answer = await showDialog({
      title: 'Stop container',
      body: `Stop the container of ${c.notebook_path || c.kernel_name || c.name}? Its kernel dies; the writable layer is kept until the kernel is shut down.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Stop' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await stopContainer(c.id);
    } catch (error) {
      void showErrorMessage(`Cannot stop ${c.name}`, (error as Error).message);
    }
    void this.refresh();
  }

  private async install(image: Image): Promise<void> {
    const form = new InstallForm(image);
    const answer = await new Dialog({
      title: `Install ${image.familiar || image.name} as a kernel`,
      body: form,
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Install' })]
    }).launch();
    if (!answer.button.accept || !answer.value) {
      return;
    }
    try {
      const spec = await installKernelspec(answer.value);
      this.hooks.kernelspecsChanged();
      const next = await showDialog({
        title: 'Kernel installed',
        body: `"${spec.display_name}" (${spec.name}) is in the launcher.`,
        buttons: [Dialog.cancelButton({ label: 'Close' }), Dialog.okButton({ label: 'New notebook with it' })]
      });
      if (next.button.accept) {
        this.hooks.openKernel(spec.name);
      }
    } catch (error) {
      void showErrorMessage(`Cannot install ${image.familiar} as a kernel`, (error as Error).message);
    }
  }

  private refreshing = false;
  private timer: number | null = null;
  private readonly errorNode = h('div', { className: 'jc-error jc-panel-error', 'aria-live': 'polite' });
  private readonly pullInput = h('input', { className: 'jp-mod-styled jc-pull-input', type: 'text', placeholder: 'registry/name:tag', spellcheck: 'false', 'aria-label': 'Image to pull' });
  private readonly pullButton = h('button', { className: 'jp-mod-styled jp-mod-accept jc-pull-button', onclick: () => void this.pull() }, 'Pull');
  private readonly pullError = h('div', { className: 'jc-field-error' });
  private readonly imagesNode = h('div', { className: 'jc-images-body' });
  private readonly opsNode = h('div', { className: 'jc-ops-body' });
  private readonly containersNode = h('div', { className: 'jc-containers-body' });
}

/** The "install as kernel" options: the server validates them again against its maxima. */
class InstallForm extends Widget implements Dialog.IBodyWidget<{ image: string; name?: string; display_name?: string; memory?: string; cpus?: string; network?: string }> {
  constructor(private readonly image: Image) {
    super();
    this.addClass('jc-install-form');
    this.node.append(
      h('label', { className: 'jc-field' }, h('span', {}, 'Name'), this.name),
      h('label', { className: 'jc-field' }, h('span', {}, 'Display name'), this.displayName),
      h('label', { className: 'jc-field' }, h('span', {}, 'Memory'), this.memory),
      h('label', { className: 'jc-field' }, h('span', {}, 'CPUs'), this.cpus),
      h('label', { className: 'jc-field' }, h('span', {}, 'Network'), this.network));
  }

  getValue() {
    const value = (input: HTMLInputElement | HTMLSelectElement) => input.value.trim() || undefined;
    return {
      image: this.image.name,
      name: value(this.name),
      display_name: value(this.displayName),
      memory: value(this.memory),
      cpus: value(this.cpus),
      network: value(this.network)
    };
  }

  private readonly name = h('input', { className: 'jp-mod-styled jc-install-name', type: 'text', placeholder: 'default: contained-<image name>' });
  private readonly displayName = h('input', { className: 'jp-mod-styled jc-install-display', type: 'text', placeholder: 'default: Contained Python (name)' });
  private readonly memory = h('input', { className: 'jp-mod-styled jc-install-memory', type: 'text', placeholder: 'e.g. 512m, 2g (default: none)' });
  private readonly cpus = h('input', { className: 'jp-mod-styled jc-install-cpus', type: 'text', placeholder: 'e.g. 0.5, 2 (default: none)' });
  private readonly network = h('select', { className: 'jp-mod-styled jc-install-network' },
    h('option', { value: '' }, 'none (loopback only)'),
    h('option', { value: 'bridge' }, 'bridge'),
    h('option', { value: 'host' }, 'host'));
}
