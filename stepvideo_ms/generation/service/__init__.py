"""`run_parallel.py --serve`: the loaded world takes jobs over HTTP and from a web page.

- board.py  the jobs: a bounded queue of waiting jobs, each job's state and step progress
- app.py    the Flask app of the job API and the page (auth, limits and the bounded threaded
            server come from stepvideo_ms.serving)
- submission.py taking a job in (checks, limits, the upload), for both faces
- openai_videos.py /v1/videos: the OpenAI Videos API face on the same jobs (docs/service-api.md)
- metrics.py GET /metrics: counters, the queue, stage and step times (prometheus_client)
- journal.py the jobs' journal in the save folder: a restart resumes the waiting and interrupted
            jobs, lists the finished ones and continues the ids
- page.html the web page (plain HTML + JS, no build step)
- main.py   the rank loop: rank 0 serves and broadcasts each job (or a heartbeat) to every rank;
            SIGTERM (or msrun's end) finishes the running job, keeps the waiting ones in the
            journal and stops every rank
"""
