/**
 * The status bar item: memory, CPU and processes of the current notebook's kernel
 * container, against its limits, from the container's cgroup (GET .../container/stats).
 *
 * Owns: following the current notebook and its kernel, the refresh timer. Must not: show
 * anything for a kernel that is not contained (the item hides), or poll while hidden.
 */
import { ISessionContext } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { kernelStats } from './api';
import { h } from './dom';
import { Level, Stats, cpuPercent, meterParts } from './format';
import { containerOf, kernelIdOf } from './kernels';

export class ContainerMeter extends Widget {
  constructor(private readonly tracker: INotebookTracker, private readonly intervalMs: number) {
    super();
    this.addClass('jc-meter');
    this.node.title = 'Container resources';
    this.node.append(this.memNode, this.cpuNode, this.pidsNode);
    tracker.currentChanged.connect(this.onCurrentChanged, this);
    document.addEventListener('visibilitychange', this.onVisibility);
    this.onCurrentChanged();
  }

  /** Whether the item has something to show (the current notebook's kernel is contained). */
  get contained(): boolean {
    return this.containedKernel !== null;
  }

  /** Emitted when `contained` changes (the status bar shows or hides the item). */
  get stateChanged(): ISignal<this, void> {
    return this._stateChanged;
  }

  dispose(): void {
    this.stopTimer();
    document.removeEventListener('visibilitychange', this.onVisibility);
    super.dispose();
  }

  private onCurrentChanged(): void {
    const context = this.tracker.currentWidget?.sessionContext ?? null;
    if (context === this.context) {
      return;
    }
    if (this.context) {
      this.context.kernelChanged.disconnect(this.onKernelChanged, this);
      this.context.statusChanged.disconnect(this.onStatusChanged, this);
    }
    this.context = context;
    if (context) {
      context.kernelChanged.connect(this.onKernelChanged, this);
      context.statusChanged.connect(this.onStatusChanged, this);
    }
    this.onKernelChanged();
  }

  private onStatusChanged(): void {
    // a kernel that was still starting when first asked is asked again once it runs
    if (this.containedKernel === null && kernelIdOf(this.context) !== null && this.context?.kernelDisplayStatus === 'idle') {
      this.onKernelChanged();
    }
  }

  private onKernelChanged(): void {
    const kernelId = kernelIdOf(this.context);
    this.previous = null;
    this.setContained(null);
    this.stopTimer();
    if (!kernelId) {
      return;
    }
    const asked = kernelId;
    containerOf(kernelId).then(answer => {
      if (kernelIdOf(this.context) !== asked || this.isDisposed) {
        return;
      }
      if (answer.contained) {
        this.setContained(asked);
        this.refresh();
        this.startTimer();
      }
    }, error => console.warn('jupyter-contain: cannot tell whether the kernel is contained', error));
  }

  private setContained(kernelId: string | null): void {
    if (kernelId === this.containedKernel) {
      return;
    }
    this.containedKernel = kernelId;
    this.node.dataset.kernelId = kernelId ?? '';
    this._stateChanged.emit();
  }

  private startTimer(): void {
    this.stopTimer();
    if (!document.hidden) {
      this.timer = window.setInterval(() => this.refresh(), this.intervalMs);
    }
  }

  private stopTimer(): void {
    if (this.timer !== null) {
      window.clearInterval(this.timer);
      this.timer = null;
    }
  }

  private readonly onVisibility = (): void => {
    if (document.hidden) {
      this.stopTimer();
    } else if (this.containedKernel) {
      this.refresh();
      this.startTimer();
    }
  };

  private async refresh(): Promise<void> {
    const kernelId = this.containedKernel;
    if (!kernelId || this.inFlight) {
      return;
    }
    this.inFlight = true;
    try {
      const stats = await kernelStats(kernelId);
      if (kernelId === this.containedKernel) {
        this.render(stats);
      }
    } catch (error) {
      // a kernel between death and restart has no cgroup for a moment: keep the last figures, dimmed
      this.node.classList.add('jc-mod-stale');
    } finally {
      this.inFlight = false;
    }
  }

  private render(stats: Stats): void {
    const parts = meterParts(stats, cpuPercent(this.previous, stats));
    this.previous = stats;
    this.node.classList.remove('jc-mod-stale');
    const set = (node: HTMLElement, part: { text: string; level: Level }) => {
      node.textContent = part.text;
      node.dataset.level = part.level;
    };
    set(this.memNode, parts.memory);
    set(this.cpuNode, parts.cpu);
    set(this.pidsNode, parts.pids);
    this.node.dataset.level = parts.level;
    this.node.title = parts.title;
  }

  private context: ISessionContext | null = null;
  private containedKernel: string | null = null;
  private previous: Stats | null = null;
  private timer: number | null = null;
  private inFlight = false;
  private readonly memNode = h('span', { className: 'jc-meter-part jc-meter-memory' }, 'Mem …');
  private readonly cpuNode = h('span', { className: 'jc-meter-part jc-meter-cpu' });
  private readonly pidsNode = h('span', { className: 'jc-meter-part jc-meter-pids' });
  private readonly _stateChanged = new Signal<this, void>(this);
}
