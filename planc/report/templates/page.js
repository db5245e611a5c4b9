(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('page-data').textContent);
  var SVG = 'http://www.w3.org/2000/svg';

  function units(n) {
    var u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'], i = 0;
    if (n < 1024) return Math.round(n) + ' B';
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return n.toFixed(2) + ' ' + u[i];
  }

  // ---- picking: rules, grid cells and graph boxes show their details and program lines -------
  var aside = document.getElementById('details');
  function pick(el) {
    var key = el.dataset.key, entry = data.details[key];
    if (!entry) return;
    document.querySelectorAll('.hl, .picked').forEach(function (x) { x.classList.remove('hl', 'picked'); });
    el.classList.add('picked');
    document.getElementById('details-title').textContent = entry.title;
    var dl = document.getElementById('details-facts');
    dl.textContent = '';
    entry.facts.forEach(function (f) {
      var dt = document.createElement('dt'), dd = document.createElement('dd');
      dt.textContent = f[0]; dd.textContent = f[1];
      dl.appendChild(dt); dl.appendChild(dd);
    });
    aside.hidden = false;
    var lines = entry.lines.map(function (n) { return document.getElementById('L' + n); }).filter(Boolean);
    lines.forEach(function (x) { x.classList.add('hl'); });
    document.getElementById('status').textContent = lines.length
      ? lines.length + ' program line(s) highlighted, from line ' + entry.lines[0]
      : 'no program lines';
    if (lines.length) lines[0].scrollIntoView({block: 'center'});
  }
  document.addEventListener('click', function (e) {
    var el = e.target.closest('[data-key]');
    if (el) pick(el);
  });
  document.addEventListener('keydown', function (e) {
    var el = e.target.closest && e.target.closest('g[data-key]');
    if (el && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); pick(el); }
    if (e.key === 'Escape') aside.hidden = true;
  });
  document.getElementById('details-close').addEventListener('click', function () { aside.hidden = true; });

  // ---- memory: weights + KV at a chosen context and batch + activations, against a device ---
  var mem = data.memory;
  function drawMemory() {
    var device = document.getElementById('mem-device').value;
    var context = Math.max(1, +document.getElementById('mem-context').value || 1);
    var batch = Math.max(1, +document.getElementById('mem-batch').value || 1);
    var capacity = mem.devices[device] * mem.usable;
    var rows = mem.ranks.map(function (r) {
      return {rank: r.rank, w: r.weights, k: r.kv_per_token * context * batch, a: r.activations_per_seq * batch};
    });
    var top = Math.max(capacity, Math.max.apply(null, rows.map(function (r) { return r.w + r.k + r.a; })));
    rows.forEach(function (r) {
      var bar = document.querySelector('.stack[data-rank="' + r.rank + '"]');
      var val = document.querySelector('.val[data-rank="' + r.rank + '"]');
      var left = 0;
      [['w', r.w], ['k', r.k], ['a', r.a]].forEach(function (part) {
        var s = bar.querySelector('.' + part[0]);
        s.style.left = (100 * left / top) + '%';
        s.style.width = (100 * part[1] / top) + '%';
        left += part[1];
      });
      bar.querySelector('.cap').style.left = 'calc(' + (100 * capacity / top) + '% - 2px)';
      var total = r.w + r.k + r.a;
      val.textContent = units(r.w) + ' + ' + units(r.k) + ' KV + ' + units(r.a) + ' act = ' + units(total) +
        (total > capacity ? ' (over ' + device + ')' : ' (' + (100 * total / capacity).toFixed(1) + '% of ' + device + ')');
      val.classList.toggle('over', total > capacity);
    });
  }
  ['mem-device', 'mem-context', 'mem-batch'].forEach(function (id) {
    document.getElementById(id).addEventListener('input', drawMemory);
  });
  drawMemory();

  // ---- timeline: per rank, compute and collective lanes of one decode step ------------------
  var LANE = 16, LABEL = 124, WIDTH = 760;
  function el(name, attrs, text) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function drawTrace(svg, trace) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var events = (trace.traceEvents || []).filter(function (e) { return e.ph === 'X'; });
    var lanes = {}, order = [];
    events.forEach(function (e) {
      var lane = e.pid + '/' + e.tid;
      if (!(lane in lanes)) { lanes[lane] = order.length; order.push([e.pid, e.tid]); }
    });
    order.sort(function (a, b) { return a[0] - b[0] || String(a[1]).localeCompare(String(b[1])); });
    order.forEach(function (l, i) { lanes[l[0] + '/' + l[1]] = i; });
    var end = Math.max.apply(null, events.map(function (e) { return e.ts + e.dur; }).concat([1]));
    var scale = (WIDTH - LABEL - 10) / end;
    svg.setAttribute('height', order.length * LANE + 24);
    svg.setAttribute('viewBox', '0 0 ' + WIDTH + ' ' + (order.length * LANE + 24));
    var names = {};
    (trace.traceEvents || []).forEach(function (e) {
      if (e.ph === 'M' && e.name === 'thread_name') names[e.pid + '/' + e.tid] = e.args.name;
      if (e.ph === 'M' && e.name === 'process_name') names[e.pid] = e.args.name;
    });
    order.forEach(function (l, i) {
      svg.appendChild(el('text', {x: 2, y: i * LANE + 12}, (names[l[0]] || 'rank ' + l[0]) + ' ' + (names[l[0] + '/' + l[1]] || l[1])));
    });
    var fills = {compute: '#3b82f6', wait: '#d1d5db', collective: '#f59e0b'};
    events.forEach(function (e) {
      var r = el('rect', {x: LABEL + e.ts * scale, y: lanes[e.pid + '/' + e.tid] * LANE + 2,
        width: Math.max(0.5, e.dur * scale), height: LANE - 4, fill: fills[e.cat] || '#6b7280'});
      r.appendChild(el('title', {}, e.name + ': ' + (e.dur / 1000).toFixed(3) + ' ms'));
      svg.appendChild(r);
    });
    svg.appendChild(el('text', {x: LABEL, y: order.length * LANE + 18}, '0'));
    svg.appendChild(el('text', {x: WIDTH - 80, y: order.length * LANE + 18}, (end / 1000).toFixed(3) + ' ms'));
    return {end: end, events: events, names: names};
  }
  var profile = document.getElementById('tl-profile');
  function drawTimeline() {
    var drawn = drawTrace(document.getElementById('tl-predicted'), data.timeline.predicted[profile.value]);
    document.getElementById('tl-summary').textContent = 'predicted step on ' + profile.value + ': ' +
      (drawn.end / 1000).toFixed(3) + ' ms, ' + drawn.events.length + ' spans (blue: reading weights and cache, ' +
      'grey: waiting for the last rank, orange: collectives)';
    document.querySelectorAll('.tl-table').forEach(function (t) { t.hidden = t.dataset.profile !== profile.value; });
  }
  profile.addEventListener('input', drawTimeline);
  drawTimeline();
  if (data.timeline.measured) drawTrace(document.getElementById('tl-measured'), data.timeline.measured);
  document.getElementById('tl-export').addEventListener('click', function () {
    var trace = data.timeline.predicted[profile.value];
    var url = URL.createObjectURL(new Blob([JSON.stringify(trace)], {type: 'application/json'}));
    var a = document.createElement('a');
    a.href = url; a.download = 'planc-decode-step-' + profile.value + '.json';
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  });
})();
