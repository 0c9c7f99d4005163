// kho's start page: find studies (QIDO-RS), show their thumbnails, open one in the viewer.
// Plain script, no build step.  Everything it shows comes from /dicom-web with the user's
// credential: a token from the URL fragment (#token=..., kept in sessionStorage for this
// tab), else the viewer's OpenID Connect sign-in (OHIF keeps it in sessionStorage), else
// none (authentication off, or a launch session's cookie, which the browser sends itself).
// Patient data is only ever put in the page as text (textContent), never as HTML.
(function () {
  'use strict';

  var base = document.querySelector('meta[name="kho-base"]').content;
  var DICOMWEB = base + '/dicom-web';
  var VIEWER = base + '/viewer/viewer';
  var TOKEN_KEY = 'kho.token';
  var STUDY_FIELDS = '00081030,00080061,00201206,00201208,00100030,00100040,00080050';
  var SERIES_FIELDS = '0008103E,00200011,00201209,00080060';
  var LIMIT = 100;
  var token = takeToken();
  var openRow = null;

  function byId(id) { return document.getElementById(id); }

  function takeToken() {
    try {
      var found = /(?:^#|&)token=([^&]+)/.exec(location.hash);
      if (found) {
        sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(found[1]));
        history.replaceState(null, '', location.pathname + location.search);
      }
      var kept = sessionStorage.getItem(TOKEN_KEY);
      if (kept) return kept;
      for (var i = 0; i < sessionStorage.length; i++) {
        var key = sessionStorage.key(i);
        if (key && key.indexOf('oidc.user:') === 0) {
          var user = JSON.parse(sessionStorage.getItem(key) || '{}');
          if (user.access_token && (!user.expires_at || user.expires_at * 1000 > Date.now())) {
            return user.access_token;
          }
        }
      }
    } catch (e) { /* no storage (private mode): no token */ }
    return null;
  }

  function AccessProblem(status) { this.status = status; }

  function get(url, accept) {
    var headers = { Accept: accept };
    if (token) headers.Authorization = 'Bearer ' + token;
    return fetch(url, { headers: headers, credentials: 'same-origin' }).then(function (r) {
      if (r.status === 401 || r.status === 403) throw new AccessProblem(r.status);
      if (!r.ok) throw new Error('the archive answered ' + r.status);
      return r;
    });
  }

  function qido(path, params) {
    var query = new URLSearchParams(params).toString();
    return get(DICOMWEB + path + (query ? '?' + query : ''), 'application/dicom+json')
      .then(function (r) { return r.status === 204 ? [] : r.json(); });
  }

  // --- DICOM JSON values -------------------------------------------------------------

  function value(item, tag) {
    var element = item[tag];
    if (!element || !element.Value || !element.Value.length) return '';
    var first = element.Value[0];
    if (first && typeof first === 'object') return first.Alphabetic || '';
    return String(first);
  }

  function values(item, tag) {
    var element = item[tag];
    return element && element.Value ? element.Value.map(String) : [];
  }

  function personName(text) {
    var parts = text.split('^');
    var family = parts[0] || '', given = parts.slice(1).filter(Boolean).join(' ');
    return given ? family + ', ' + given : family;
  }

  function isoDate(text) {
    return /^\d{8}$/.test(text) ? text.slice(0, 4) + '-' + text.slice(4, 6) + '-' + text.slice(6) : text;
  }

  function dicomDate(input) { return input ? input.replace(/-/g, '') : ''; }

  // --- images: <img src> when no token is needed, else fetched with it ------------------

  var observer = 'IntersectionObserver' in window ? new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      if (entry.isIntersecting) {
        observer.unobserve(entry.target);
        loadImage(entry.target);
      }
    });
  }, { rootMargin: '200px' }) : null;

  function firstImageShown() {
    if (window.khoFirstImageMs === undefined) window.khoFirstImageMs = performance.now();
  }

  function loadImage(img) {
    var url = img.dataset.src;
    img.addEventListener('load', firstImageShown, { once: true });
    if (!token) {
      img.src = url;
      return;
    }
    get(url, 'image/jpeg').then(function (r) { return r.blob(); }).then(function (blob) {
      img.src = URL.createObjectURL(blob);
    }).catch(function () { img.classList.add('missing'); });
  }

  // the first screenful at once (an observer's first callback waits for a frame), the
  // rest when scrolled near
  var EAGER = 12;
  var eager = 0;

  function thumbnail(url, alt) {
    var img = document.createElement('img');
    img.className = 'thumb';
    img.alt = alt;
    img.dataset.src = url;
    img.addEventListener('error', function () { img.classList.add('missing'); });
    if (observer && eager >= EAGER) observer.observe(img); else { eager++; loadImage(img); }
    return img;
  }

  // --- the viewer --------------------------------------------------------------------

  function viewerUrl(study, series) {
    var url = VIEWER + '?StudyInstanceUIDs=' + encodeURIComponent(study);
    if (series) url += '&initialSeriesInstanceUID=' + encodeURIComponent(series);
    // the token travels in the fragment (never sent to a server); the viewer's page moves it
    return token ? url + '#token=' + encodeURIComponent(token) : url;
  }

  function cell(row, text, className) {
    var td = document.createElement('td');
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  // --- results -----------------------------------------------------------------------

  function showStudies(studies) {
    var table = byId('studies');
    var body = table.querySelector('tbody');
    body.textContent = '';
    openRow = null;
    eager = 0;
    studies.sort(function (a, b) {
      var ka = value(a, '00080020') + value(a, '00080030');
      var kb = value(b, '00080020') + value(b, '00080030');
      return ka < kb ? 1 : ka > kb ? -1 : 0;
    });
    studies.forEach(function (study) {
      var uid = value(study, '0020000D');
      var row = document.createElement('tr');
      row.className = 'study';
      row.dataset.study = uid;
      var first = document.createElement('td');
      first.appendChild(thumbnail(DICOMWEB + '/studies/' + encodeURIComponent(uid) + '/thumbnail', 'study'));
      row.appendChild(first);
      cell(row, personName(value(study, '00100010')), 'name');
      cell(row, value(study, '00100020'));
      cell(row, isoDate(value(study, '00100030')));
      cell(row, value(study, '00100040'));
      cell(row, isoDate(value(study, '00080020')));
      cell(row, value(study, '00081030'));
      cell(row, values(study, '00080061').join(', '));
      cell(row, value(study, '00080050'));
      cell(row, value(study, '00201206') + ' / ' + value(study, '00201208'));
      var open = document.createElement('a');
      open.className = 'open';
      open.textContent = 'Open';
      open.href = viewerUrl(uid);
      open.addEventListener('click', function (event) { event.stopPropagation(); });
      row.appendChild(document.createElement('td')).appendChild(open);
      row.addEventListener('click', function () { toggleSeries(row, uid); });
      body.appendChild(row);
    });
    table.hidden = studies.length === 0;
    byId('status').textContent = studies.length === 0 ? 'No studies match.'
      : studies.length + (studies.length === 1 ? ' study' : ' studies')
        + (studies.length >= LIMIT ? ' (the first ' + LIMIT + '; narrow the search)' : '');
  }

  function toggleSeries(row, study) {
    if (openRow) {
      openRow.parentNode.removeChild(openRow);
      var wasThis = openRow.previousSibling === row;
      openRow = null;
      if (wasThis) return;
    }
    var detail = document.createElement('tr');
    detail.className = 'series-row';
    var td = document.createElement('td');
    td.colSpan = 11;
    var strip = document.createElement('div');
    strip.className = 'series';
    strip.textContent = 'Loading series…';
    td.appendChild(strip);
    detail.appendChild(td);
    row.parentNode.insertBefore(detail, row.nextSibling);
    openRow = detail;
    qido('/studies/' + encodeURIComponent(study) + '/series', { includefield: SERIES_FIELDS })
      .then(function (series) {
        strip.textContent = '';
        eager = 0;
        series.sort(function (a, b) {
          return (parseInt(value(a, '00200011'), 10) || 0) - (parseInt(value(b, '00200011'), 10) || 0);
        });
        series.forEach(function (one) {
          var uid = value(one, '0020000E');
          var link = document.createElement('a');
          link.className = 'series-item';
          link.href = viewerUrl(study, uid);
          link.appendChild(thumbnail(DICOMWEB + '/studies/' + encodeURIComponent(study)
            + '/series/' + encodeURIComponent(uid) + '/thumbnail', 'series'));
          var label = document.createElement('span');
          label.textContent = [value(one, '00080060'), value(one, '00200011') && '#' + value(one, '00200011'),
            value(one, '0008103E'), value(one, '00201209') && '(' + value(one, '00201209') + ')']
            .filter(Boolean).join(' ');
          link.appendChild(label);
          strip.appendChild(link);
        });
        if (!series.length) strip.textContent = 'No series.';
      })
      .catch(function (error) { strip.textContent = problemText(error); });
  }

  function problemText(error) {
    if (error instanceof AccessProblem) {
      return error.status === 401 ? 'Sign-in is needed.' : 'Your access does not include this.';
    }
    return 'The search failed: ' + (error && error.message ? error.message : error);
  }

  // --- the search --------------------------------------------------------------------

  function search(form) {
    var f = form.elements;
    var params = { limit: String(LIMIT), includefield: STUDY_FIELDS, fuzzymatching: 'true' };
    var name = f.name.value.trim();
    if (name) params.PatientName = /[*?]/.test(name) ? name : '*' + name + '*';
    if (f.patient.value.trim()) params.PatientID = f.patient.value.trim();
    if (f.accession.value.trim()) params.AccessionNumber = f.accession.value.trim();
    var from = dicomDate(f.from.value), to = dicomDate(f.to.value);
    if (from || to) params.StudyDate = from === to ? from : from + '-' + to;
    if (f.modality.value) params.ModalitiesInStudy = f.modality.value;
    var citizen = f.citizen.value.trim();
    var queries;
    if (citizen) {
      // a citizen ID is the patient's ID at this hospital or one of their other IDs
      var asPatientId = Object.assign({}, params, { PatientID: citizen });
      var asOtherId = Object.assign({}, params, { 'OtherPatientIDsSequence.PatientID': citizen });
      queries = [qido('/studies', asPatientId), qido('/studies', asOtherId)];
    } else {
      queries = [qido('/studies', params)];
    }
    byId('status').textContent = 'Searching…';
    return Promise.all(queries).then(function (results) {
      var seen = {}, merged = [];
      results.forEach(function (list) {
        list.forEach(function (study) {
          var uid = value(study, '0020000D');
          if (!seen[uid]) { seen[uid] = true; merged.push(study); }
        });
      });
      byId('signin').hidden = true;
      showStudies(merged);
    }).catch(function (error) {
      byId('studies').hidden = true;
      if (error instanceof AccessProblem && error.status === 401) {
        byId('signin').hidden = false;
        byId('status').textContent = '';
        return;
      }
      byId('status').textContent = problemText(error);
    });
  }

  var form = byId('search');
  form.addEventListener('submit', function (event) {
    event.preventDefault();
    search(form);
  });
  form.addEventListener('reset', function () {
    setTimeout(function () { search(form); }, 0);
  });
  // a token handed over later in this tab (the address's fragment changed, no reload)
  window.addEventListener('hashchange', function () {
    var fresh = takeToken();
    if (fresh && fresh !== token) {
      token = fresh;
      search(form);
    }
  });
  search(form);
})();
