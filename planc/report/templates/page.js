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
  // a compact trace: spans [pid, tid, cat, start_us, end_us, name index], labels of pids and pid/tids
  function drawTrace(svg, trace) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var spans = trace.spans, lanes = {}, order = [];
    spans.forEach(function (s) {
      var lane = s[0] + '/' + s[1];
      if (!(lane in lanes)) { lanes[lane] = 0; order.push([s[0], s[1]]); }
    });
    order.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1]; });
    order.forEach(function (l, i) { lanes[l[0] + '/' + l[1]] = i; });
    var end = Math.max.apply(null, spans.map(function (s) { return s[4]; }).concat([1]));
    var scale = (WIDTH - LABEL - 10) / end, height = order.length * LANE + 24;
    svg.setAttribute('height', height);
    svg.setAttribute('viewBox', '0 0 ' + WIDTH + ' ' + height);
    order.forEach(function (l, i) {
      var label = (trace.labels[l[0]] || 'rank ' + l[0]).replace(/ \(.*\)$/, '') + ' ' + (trace.labels[l[0] + '/' + l[1]] || l[1]);
      svg.appendChild(el('text', {x: 2, y: i * LANE + 12}, label));
    });
    var fills = {compute: '#3b82f6', wait: '#d1d5db', collective: '#f59e0b'};
    spans.forEach(function (s) {
      var r = el('rect', {x: LABEL + s[3] * scale, y: lanes[s[0] + '/' + s[1]] * LANE + 2,
        width: Math.max(0.5, (s[4] - s[3]) * scale), height: LANE - 4, fill: fills[s[2]] || '#6b7280'});
      r.appendChild(el('title', {}, data.timeline.names[s[5]] + ' (' + s[2] + '): ' + ((s[4] - s[3]) / 1000).toFixed(4) + ' ms'));
      svg.appendChild(r);
    });
    svg.appendChild(el('text', {x: LABEL, y: height - 6}, '0'));
    svg.appendChild(el('text', {x: WIDTH - 80, y: height - 6}, (end / 1000).toFixed(3) + ' ms'));
    return {end: end, spans: spans.length};
  }
  function chromeTrace(trace) {  // the compact trace back in Chrome's JSON object format
    var events = [];
    Object.keys(trace.labels).forEach(function (key) {
      var parts = key.split('/');
      events.push(parts.length === 1
        ? {name: 'process_name', ph: 'M', pid: +parts[0], tid: 0, args: {name: trace.labels[key]}}
        : {name: 'thread_name', ph: 'M', pid: +parts[0], tid: +parts[1], args: {name: trace.labels[key]}});
    });
    trace.spans.forEach(function (s) {
      events.push({name: data.timeline.names[s[5]], cat: s[2], ph: 'X', pid: s[0], tid: s[1], ts: s[3], dur: s[4] - s[3], args: {}});
    });
    return {traceEvents: events, displayTimeUnit: 'ms', metadata: trace.metadata};
  }
  var profile = document.getElementById('tl-profile');
  function drawTimeline() {
    var drawn = drawTrace(document.getElementById('tl-predicted'), data.timeline.predicted[profile.value]);
    document.getElementById('tl-summary').textContent = 'predicted step on ' + profile.value + ': ' +
      (drawn.end / 1000).toFixed(3) + ' ms, ' + drawn.spans + ' spans (blue: reading weights and cache, ' +
      'grey: waiting for the last rank, orange: collectives)';
    document.querySelectorAll('.tl-table').forEach(function (t) { t.hidden = t.dataset.profile !== profile.value; });
  }
  profile.addEventListener('input', drawTimeline);
  drawTimeline();
  if (data.timeline.measured) drawTrace(document.getElementById('tl-measured'), data.timeline.measured);
  document.getElementById('tl-export').addEventListener('click', function () {
    var trace = chromeTrace(data.timeline.predicted[profile.value]);
    var url = URL.createObjectURL(new Blob([JSON.stringify(trace)], {type: 'application/json'}));
    var a = document.createElement('a');
    a.href = url; a.download = 'planc-decode-step-' + profile.value + '.json';
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  });
})();
