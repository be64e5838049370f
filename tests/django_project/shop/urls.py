from django.urls import path

from . import views

urlpatterns = [
    path("customers/", views.create_customer, name="create_customer"),
    path("customers/<int:pk>/", views.customer_detail, name="customer_detail"),
    path("customers/<int:pk>/async/", views.customer_detail_async, name="customer_detail_async"),
    path("customers/create-and-read/", views.create_and_read, name="create_and_read"),
]
