from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("projects", views.list_projects),
    path("reports/<str:report_id>/export", views.export_report),
    path("reports/<str:report_id>/schedule", views.schedule_report),
    path("summarize", views.summarize),
]
